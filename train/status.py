"""Run states and `<run_dir>/status.json`, the one file that says how a run stands.

The run writes it (rank 0: `RunLog`, `mark_failed`; the job wrapper: `set_state` before a
requeue); `sweep/` reads it and combines it with the scheduler's view (`sweep.state.resolve`),
because SLURM's COMPLETED alone does not say a run succeeded (a Python exception can end a job as
COMPLETED). No torch here: the login node and the analysis read this module too.
"""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"


class RunState(StrEnum):
    """Every state a job of a sweep can be in.

    A run writes RUNNING, REQUEUED, STOPPED, COMPLETED, FAILED or DIVERGED into its status file;
    the sweep's resolver adds PENDING (queued or not yet submitted), TIMEOUT and LOST (its job left
    the queue without the run saying how it ended); the local launcher adds SKIPPED (a job it
    depends on did not complete).
    """

    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"
    DIVERGED = "diverged"
    TIMEOUT = "timeout"
    LOST = "lost"
    SKIPPED = "skipped"


FINAL = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.DIVERGED})  # the run has ended for good
RECORDED_END = FINAL | {RunState.STOPPED}  # the run itself wrote how this attempt ended
IN_FLIGHT = frozenset({RunState.PENDING, RunState.RUNNING})  # queued or running: leave it alone
# Resubmitted by a plain rerun of the sweep; a diverged run would diverge again (rerun it by name).
RESUBMIT = frozenset({RunState.FAILED, RunState.TIMEOUT, RunState.LOST})
BAD = RESUBMIT | {RunState.DIVERGED}  # `sweep.status` exits 1 when any job is in one of these
NOT_DONE = BAD | {RunState.SKIPPED}  # the sweep command exits 1 when any job ended in one of these


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name and rename it: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status, or None when it has none yet or the file is torn (a killed writer)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return status


def write_status(run_dir: str | Path, status: dict[str, Any]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(run_dir) / STATUS_FILE, status)


def set_state(run_dir: str | Path, state: RunState, error: str | None = None, **fields: Any) -> None:
    """Record `state` (and `error`) in the run's status, keeping what else it holds."""
    status = read_status(run_dir) or {}
    status.update(fields, state=state, error=error, heartbeat=time.time())
    write_status(run_dir, status)


def mark_failed(run_dir: str | Path, error: str, **fields: Any) -> None:
    """Record FAILED unless the run already recorded how it ended (completed, failed, diverged,
    stopped): the last word for errors that escape the training loop (bad data, start-up)."""
    status = read_status(run_dir)
    if status is not None and status.get("state") in RECORDED_END:
        return
    set_state(run_dir, RunState.FAILED, error, **fields)
