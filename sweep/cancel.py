"""`python -m sweep.cancel <sweep dir | experiment> [--arms A,H]`: stop queued and running jobs.

On SLURM it scancels them; on a sweep that runs on this machine it asks each running job to stop
(SIGTERM: the trainer checkpoints at its next step and exits, resumable by the sweep command)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from sweep.manifest import read_manifest, sweep_dir_of, sweep_parser
from sweep.state import latest_job_ids, squeue_states, sweep_states
from train.status import IN_FLIGHT, claimant


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser("python -m sweep.cancel", __doc__)
    parser.add_argument("--arms", default="", help="comma-separated job names (default: all)")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(sweep_dir_of(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = {a for a in args.arms.split(",") if a}
    if manifest.get("executor") == "local":
        return _stop_local(manifest, only)
    queue = squeue_states()
    if queue is None:
        print("error: no SLURM controller answers `squeue` here", file=sys.stderr)
        return 2
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


def _stop_local(manifest: dict[str, Any], only: set[str]) -> int:
    """Stop a sweep that runs on this machine: its launcher first (without --arms), so that it
    starts nothing more, then each running job's trainer (SIGTERM: a checkpoint at its next step)."""
    targets = [] if only else [("the launcher", claimant(manifest["sweep_dir"]))]
    targets += [
        (name, claimant(job["run_dir"])) for name, job in manifest["jobs"].items() if not only or name in only
    ]
    stopped = 0
    for name, owner in targets:
        if owner is None:
            continue
        if owner.get("host") != socket.gethostname() or not owner.get("pid"):
            print(f"{name}: runs on {owner.get('host', '?')}, not here: stop it there", file=sys.stderr)
            continue
        try:
            os.kill(int(owner["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped += 1
        what = "" if name == "the launcher" else ": it checkpoints at its next step"
        print(f"stopping {name} (pid {owner['pid']}){what}")
    if stopped:
        print("resume with the sweep command: stopped jobs continue from their checkpoints")
    else:
        print("nothing to cancel")
    return 0


def run() -> None:
    """The `bss-cancel` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
