"""SLURM side of the product: the job entry point submitit runs, and (later) the local test cluster."""
