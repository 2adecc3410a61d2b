"""`python -m sweep.status <sweep dir | experiment name>`: one table of every job of a sweep.

States come from each run's own `status.json` (and the prepared data's `meta.json`), never from
the scheduler alone. Exit code 1 if any job failed or diverged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sweep.manifest import read_manifest
from sweep.plan import format_table
from train.runlog import read_status

COLUMNS = ["job", "state", "job_id", "tokens", "budget", "loss", "tokens_per_s", "run_dir"]


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    manifest = read_manifest(sweep_dir)
    rows = []
    for name, job in manifest["jobs"].items():
        run_dir = Path(job["run_dir"])
        if job["kind"] == "prepare":
            status: dict[str, Any] = {"state": "completed" if (run_dir / "meta.json").exists() else "pending"}
        else:
            status = read_status(run_dir) or {"state": "pending"}
        rows.append(
            {
                "job": name,
                "state": status["state"],
                "job_id": (job.get("job_ids") or [None])[-1],
                "tokens": status.get("tokens"),
                "budget": status.get("token_budget", job.get("derived", {}).get("token_budget")),
                "loss": status.get("loss"),
                "tokens_per_s": round(status["tokens_per_s"]) if status.get("tokens_per_s") else None,
                "run_dir": str(run_dir),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a sweep dir, or an experiment name (looked up under --root)")
    parser.add_argument("--root", default="sweeps", help="where experiment names live (default: sweeps)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep)
    if not (sweep_dir / "manifest.json").exists():
        sweep_dir = Path(args.root) / args.sweep
    try:
        rows = sweep_rows(sweep_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, COLUMNS))
    return 1 if any(r["state"] in ("failed", "diverged") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
