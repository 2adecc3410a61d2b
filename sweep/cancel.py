"""`python -m sweep.cancel <sweep dir | experiment> [--arms A,H]`: scancel queued and running jobs."""

from __future__ import annotations

import subprocess
import sys

from sweep.manifest import read_manifest, sweep_dir_of, sweep_parser
from sweep.state import latest_job_ids, squeue_states, sweep_states
from train.status import IN_FLIGHT


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser("python -m sweep.cancel", __doc__)
    parser.add_argument("--arms", default="", help="comma-separated job names (default: all)")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(sweep_dir_of(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    queue = squeue_states()
    if queue is None:
        print("error: no SLURM controller answers `squeue` here", file=sys.stderr)
        return 2
    only = {a for a in args.arms.split(",") if a}
    states = sweep_states(manifest, queue)
    latest = latest_job_ids(manifest)
    targets = {
        name: latest[name]
        for name, state in states.items()
        if state.state in IN_FLIGHT and name in latest and (not only or name in only)
    }
    if not targets:
        print("nothing to cancel")
        return 0
    subprocess.run(["scancel", *targets.values()], check=True)
    for name, job_id in targets.items():
        print(f"cancelled {name}: job {job_id}")
    return 0


def run() -> None:
    """The `bss-cancel` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
