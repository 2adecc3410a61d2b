"""`python -m sweep.status <sweep dir | experiment name> [--watch S]`: one table of every job of a sweep.

States (pending, running, completed, failed, diverged, timeout, lost) come from each run's own
`status.json` together with one batched `squeue` call (and `sacct` for jobs that left the queue,
where accounting exists): a job SLURM calls COMPLETED whose Python raised is `failed`. Exit code
1 if any job failed, diverged, timed out or was lost.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sweep.manifest import read_manifest, sweep_dir_of, sweep_parser
from sweep.plan import format_table
from sweep.state import latest_job_id, squeue_states, sweep_states
from train.status import BAD, IN_FLIGHT, RunState

COLUMNS = [
    "job",
    "replicate",
    "state",
    "job_id",
    "tokens",
    "budget",
    "loss",
    "tokens_per_s",
    "eta",
    "requeues",
    "wandb",
    "note",
]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _wandb_path(run_dir: Path, status: dict[str, Any]) -> str:
    offline = sorted(run_dir.glob("wandb/offline-run-*"))
    if offline:
        return str(offline[-1])
    return f"{status.get('wandb_path', '')}"


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(sweep_dir)
    states = sweep_states(manifest, squeue_states())
    rows = []
    for name, job in manifest["jobs"].items():
        state = states[name]
        status = state.status or {}
        tokens, budget, speed = status.get("tokens"), status.get("token_budget"), status.get("tokens_per_s")
        eta = (
            (budget - tokens) / speed
            if state.state == RunState.RUNNING and speed and budget and tokens is not None
            else None
        )
        rows.append(
            {
                "job": name,
                "replicate": job.get("derived", {}).get("replicate", ""),
                "state": state.state,
                "job_id": latest_job_id(job) or "",
                "tokens": tokens,
                "budget": budget if budget is not None else job.get("derived", {}).get("token_budget"),
                "loss": status.get("loss"),
                "tokens_per_s": round(speed) if speed else None,
                "eta": _duration(eta),
                "requeues": (status.get("launch") or {}).get("restarts"),
                "wandb": _wandb_path(Path(job["run_dir"]), status) if job["kind"] != "prepare" else "",
                "note": state.reason,
            }
        )
    return rows


def _verdicts(sweep_dir: Path, skip_tokens: int) -> str:
    """The declared pairs' verdicts now, from what the arms logged so far (defaults of the analysis)."""
    from analysis.report import Comparison, live_verdicts, verdict_table
    from analysis.tables import BinSpec

    pairs = live_verdicts(sweep_dir, Comparison([], BinSpec(skip_tokens=skip_tokens)))
    if pairs.empty:
        return "\nverdicts: no pair has rows in both arms yet"
    return "\nverdicts so far (python -m analysis for the tables, plots and options):\n" + verdict_table(
        pairs
    )


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser("python -m sweep.status", __doc__)
    parser.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds until all jobs end")
    parser.add_argument(
        "--verdicts",
        action="store_true",
        help="also each declared pair's verdict from the rows logged so far (python -m analysis's method)",
    )
    parser.add_argument(
        "--skip-tokens",
        type=int,
        default=0,
        metavar="N",
        help="with --verdicts: leave out the first N tokens",
    )
    args = parser.parse_args(argv)
    sweep_dir = sweep_dir_of(args)
    while True:
        try:
            rows = sweep_rows(sweep_dir)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        table = format_table(rows, COLUMNS)
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + str(sweep_dir))
        print(table, flush=True)
        if args.verdicts:
            print(_verdicts(sweep_dir, args.skip_tokens), flush=True)
        if not args.watch or all(r["state"] not in IN_FLIGHT for r in rows):
            break
        time.sleep(args.watch)
    return 1 if any(r["state"] in BAD for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
