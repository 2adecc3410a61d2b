"""Run states, `<run_dir>/status.json` (the one file that says how a run stands) and the run's claim.

The run writes it (rank 0: `RunLog`, `mark_failed`; the job wrapper: `set_state` before a
requeue); `sweep/` reads it and combines it with the scheduler's view (`sweep.job_states`),
because SLURM's COMPLETED alone does not say a run succeeded (a Python exception can end a job as
COMPLETED); the analysis reads a run's final state from it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

from records.atomic import write_json_atomic

STATUS_FILE = "status.json"
# A run's checkpoints (train/checkpoint.py writes them): `<run_dir>/checkpoints/step-<step>.pt`, each
# completed by `step-<step>.pt.sha256` holding its SHA-256 (a branch point's content: train/branch_point.py).
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_MARKER = ".sha256"


class RunState(StrEnum):
    """Every state a job of a sweep can be in.

    A run writes RUNNING, REQUEUED, STOPPED, COMPLETED, DECIDED, FAILED or DIVERGED into its status file;
    the sweep's resolver adds PENDING (queued or not yet submitted), TIMEOUT and LOST (its job left
    the queue without the run saying how it ended); the local launcher adds SKIPPED (a job it
    depends on did not complete). STOPPED (a stop signal: SIGTERM, preemption, Ctrl-C; the run
    checkpointed) is resumable: a rerun of the sweep command continues it. DECIDED: an arm that
    stopped itself once its pairs were decided (`experiment.stop_when_decided`): done, like
    COMPLETED, and never resubmitted.
    """

    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"
    STOPPED = "stopped"
    COMPLETED = "completed"
    DECIDED = "decided"
    FAILED = "failed"
    DIVERGED = "diverged"
    TIMEOUT = "timeout"
    LOST = "lost"
    SKIPPED = "skipped"


DONE = frozenset({RunState.COMPLETED, RunState.DECIDED})  # ended as planned: nothing left to run
FINAL = DONE | {RunState.FAILED, RunState.DIVERGED}  # the run has ended for good
RECORDED_END = FINAL | {RunState.STOPPED}  # the run itself wrote how this attempt ended
IN_FLIGHT = frozenset({RunState.PENDING, RunState.RUNNING})  # queued or running: leave it alone
# Resubmitted by a plain rerun of the sweep; a diverged run would diverge again (rerun it by name).
RESUBMIT = frozenset({RunState.FAILED, RunState.TIMEOUT, RunState.LOST, RunState.STOPPED})
# `sweep.status` exits 1 when any job is in one of these (a stopped run checkpointed: not bad).
BAD = frozenset({RunState.FAILED, RunState.TIMEOUT, RunState.LOST, RunState.DIVERGED})
NOT_DONE = BAD | {RunState.SKIPPED, RunState.STOPPED}  # the sweep command exits 1 on any of these


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


class RunInUse(RuntimeError):
    """Another live process holds this run dir (a second start of the same arm) or sweep dir."""


class RunClaim:
    """An exclusive claim on a run dir by the one process that trains it: an flock on
    `<run_dir>/.owner`, which holds that process's pid, host and job id for the message.

    The kernel releases the lock when the process dies, however it dies, so a claim is never
    stale. Where the file system has no flock (some network mounts), claims are skipped with a
    warning and only the sweep's own bookkeeping prevents double starts."""

    FILE = ".owner"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.FILE
        self._fd: int | None = None

    def acquire(self, **who: Any) -> None:
        """Claim the run dir or raise RunInUse naming its owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(f"{self.path.parent} is in use by {owner_text(self.path)}") from None
        except OSError as exc:  # no flock on this file system
            os.close(fd)
            warnings.warn(
                f"cannot lock {self.path} ({exc.strerror}): a second start would not be stopped", stacklevel=2
            )
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **who}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claimed_by(run_dir: str | Path) -> str | None:
    """Who trains `run_dir` right now (pid, host, job), or None when nobody holds its claim."""
    info = claimant(run_dir)
    return None if info is None else _describe(info)


def claimant(run_dir: str | Path) -> dict[str, Any] | None:
    """The claim of the process that trains `run_dir` right now (pid, host, job id), or None."""
    path = Path(run_dir) / RunClaim.FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _claim_info(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def owner_text(path: Path) -> str:
    return _describe(_claim_info(path))


def _claim_info(path: Path) -> dict[str, Any]:
    """What a claim file says (pid, host, job id); {} where it is unreadable or torn."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    job = f", job {info['job_id']}" if info.get("job_id") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{job}"
