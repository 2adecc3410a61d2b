"""`python -m sweep.cancel <sweep dir | experiment> [--arms A,H]`: stop queued and running jobs.

On SLURM it scancels them; on a sweep that runs on this machine it asks each running job to stop
(SIGTERM: the trainer checkpoints at its next step and exits, resumable by the sweep command)."""

from __future__ import annotations

import argparse
import sys

from records.manifest import read_manifest
from sweep.backend import backend_for
from sweep.manifest import sweep_dir_of, sweep_parser


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py parses every documented use with it)."""
    cli = sweep_parser("python -m sweep.cancel", __doc__)
    cli.add_argument("--arms", default="", help="comma-separated job names (default: all)")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        manifest = read_manifest(sweep_dir_of(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = {a for a in args.arms.split(",") if a}
    return backend_for(manifest.get("executor", "slurm")).cancel(manifest, only)


def run() -> None:
    """The `bss-cancel` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
