"""`python -m sweep.resubmit <sweep dir | experiment>`: resubmit a sweep's jobs explicitly.

    python -m sweep.resubmit <sweep dir | experiment> [--arms A,H] [--failed] [--local | --slurm]

Without --arms it does what re-running the sweep command does (failed, timeout and lost jobs are
resubmitted; completed, queued and running ones are left alone); --arms also reruns named arms
that diverged; --failed restricts to jobs in a failed state. Jobs resume from their newest
checkpoint. It reads the manifest, so it needs no config and resubmits exactly what was planned,
where the sweep ran (its manifest's executor) unless --local or --slurm says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from records.manifest import read_manifest
from records.run_status import RESUBMIT
from sweep.backend import backend_for
from sweep.job_states import sweep_states
from sweep.launch import LauncherOptions, execute
from sweep.manifest import plan_from_manifest, sweep_dir_of, sweep_parser


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py parses every documented use with it)."""
    cli = sweep_parser("python -m sweep.resubmit", __doc__)
    cli.add_argument(
        "--arms", default="", help="comma-separated arm names (default: every job that needs it)"
    )
    cli.add_argument("--failed", action="store_true", help="only jobs that failed, timed out or were lost")
    where = cli.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run here (default for a sweep that ran here)")
    where.add_argument("--slurm", action="store_true", help="submit to SLURM (default for a SLURM sweep)")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan = plan_from_manifest(sweep_dir_of(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(only) - {j.name for j in plan.jobs})
    if unknown:
        print(f"error: no job(s) {', '.join(unknown)} in {plan.dir}", file=sys.stderr)
        return 2
    recorded = read_manifest(plan.dir).get("executor", "slurm")
    executor = "local" if args.local else "slurm" if args.slurm else recorded
    if args.failed:
        states = sweep_states(read_manifest(plan.dir), backend_for(executor).queue())
        failed = [n for n, s in states.items() if s.state in RESUBMIT]
        only = [n for n in (only or failed) if n in failed]
        if not only:
            print("nothing failed: nothing to resubmit")
            return 0
    execute(plan, LauncherOptions(executor=executor, analyze=False, only=only))
    return 0


def run() -> None:
    """The `bss-resubmit` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
