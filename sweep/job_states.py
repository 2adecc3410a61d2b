"""What state is each job of a sweep in? One answer for `sweep.status` and for resubmission.

The run's own `status.json` decides how a run ended (a job SLURM calls COMPLETED whose Python
raised is `failed`). The queue says whether it is still waiting or running: one batched `squeue`
call per refresh, and `sacct` only for jobs that left the queue without a final status, and only
where accounting is enabled.

The states are `records.run_status.RunState`; this module is the one place that decides them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from records.run_status import FINAL, RunState, claimed_by, read_status

LOST_AFTER_S = 300.0  # a run whose heartbeat is older than this, and whose job left the queue, is lost

NEVER = "DEPENDENCY_NEVER_SATISFIED"  # squeue state + reason of a job stuck behind a failed dependency
STUCK = "a job it depends on failed (still queued; resubmitting cancels it)"
NOT_SUBMITTED = "not submitted"
_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass
class JobState:
    state: RunState
    reason: str = ""  # e.g. "cancelled", "scheduler: TIMEOUT", the error of a failed run
    status: dict[str, Any] | None = None

    @property
    def unsubmitted(self) -> bool:
        return self.state == RunState.PENDING and self.reason == NOT_SUBMITTED


def squeue_states() -> dict[str, str] | None:
    """SLURM state of every queued job of this user, by job id ("123" or "123_4"); None without SLURM."""
    if not shutil.which("squeue"):
        return None
    out = subprocess.run(
        ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        # A job whose dependency failed waits forever: it will never run, so it is not pending.
        states[job_id.strip()] = NEVER if reason.strip() == "DependencyNeverSatisfied" else state.strip()
    return states


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Final SLURM state of jobs that left the queue; empty where accounting is disabled."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:  # "accounting storage is disabled" on clusters without slurmdbd
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.split()[0] if state.strip() else ""
    return states


def read_own_status(kind: str, run_dir: Path) -> dict[str, Any] | None:
    """What a job's own files say: the prepared data's meta.json, or the run's status.json and
    whether a live process holds the run's claim (`claimed_by`)."""
    if kind == "prepare":
        return {"state": RunState.COMPLETED} if (run_dir / "meta.json").exists() else None
    status = read_status(run_dir)
    owner = claimed_by(run_dir)
    if owner is not None:
        status = {**(status or {}), "claimed_by": owner}
    return status


def _alive_here(status: dict[str, Any]) -> bool:
    """False only when the run's process was on this host and no longer exists."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return True
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve(
    status: dict[str, Any] | None,
    job_id: str | None,
    queue: dict[str, str] | None,
    accounting: dict[str, str],
    now: float | None = None,
    ended: bool = False,
) -> JobState:
    """The state of one job from its own status, the queue (None: no scheduler), accounting and,
    for a local job, whether its process has `ended`."""
    own = (status or {}).get("state")
    error = (status or {}).get("error") or ""
    if own in FINAL:
        return JobState(RunState(own), error, status)
    owner = (status or {}).get("claimed_by")
    if owner:  # a live trainer holds the run, whichever job started it
        return JobState(RunState.RUNNING, f"trained by {owner}", status)
    if queue is not None and job_id and job_id in queue:
        slurm = queue[job_id]
        if slurm == NEVER:
            return JobState(RunState.FAILED, STUCK, status)
        if slurm in _QUEUED:
            return JobState(RunState.PENDING, slurm.lower(), status)
        if slurm in _RUNNING:
            return JobState(RunState.RUNNING, "", status)
    acct = accounting.get(job_id or "", "")
    if own == RunState.STOPPED:  # stopped on a signal and checkpointed; not (or no longer) queued
        scheduler = f"; scheduler: {acct}" if acct else ""
        return JobState(RunState.STOPPED, f"resumable: {error or 'stopped'}{scheduler}", status)
    if acct == "TIMEOUT":
        return JobState(RunState.TIMEOUT, "scheduler: TIMEOUT", status)
    if acct.startswith("CANCELLED"):
        return JobState(RunState.FAILED, "cancelled", status)
    if acct in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
        return JobState(RunState.FAILED, f"scheduler: {acct}", status)
    if ended:  # a local job whose process returned without the run saying how it ended
        return JobState(RunState.FAILED, error or "its process ended before the run recorded an end", status)
    if own in (RunState.RUNNING, RunState.REQUEUED):
        age = (now or time.time()) - float((status or {}).get("heartbeat", 0))
        if queue is None and not _alive_here(status or {}):
            return JobState(RunState.LOST, "its process is gone", status)
        if queue is None and age < LOST_AFTER_S:
            return JobState(RunState.RUNNING, "", status)  # a local run still beating
        if queue is not None and job_id and age < LOST_AFTER_S and own == RunState.REQUEUED:
            return JobState(RunState.PENDING, "requeued", status)
        return JobState(RunState.LOST, f"no heartbeat for {age:.0f} s and not in the queue", status)
    if job_id and queue is not None:
        return JobState(RunState.LOST, "left the queue without starting", status)
    return JobState(RunState.PENDING, NOT_SUBMITTED, status)


def latest_job_id(entry: dict[str, Any]) -> str | None:
    """The id of the newest job submitted for a manifest entry (None: never submitted)."""
    ids = entry.get("job_ids") or []
    return str(ids[-1]) if ids else None


def latest_job_ids(manifest: dict[str, Any]) -> dict[str, str]:
    """The newest job id of every job of a manifest that was ever submitted."""
    return {name: job_id for name, entry in manifest["jobs"].items() if (job_id := latest_job_id(entry))}


def job_state(kind: str, run_dir: Path, job_id: str | None = None, ended: bool = False) -> JobState:
    """The state of one job without asking the scheduler: local jobs, and single-arm mode."""
    return resolve(read_own_status(kind, run_dir), job_id, None, {}, ended=ended)


def sweep_states(manifest: dict[str, Any], queue: dict[str, str] | None) -> dict[str, JobState]:
    """State of every job of a manifest, asking `sacct` only about jobs that need it."""
    jobs = manifest["jobs"]
    last_id = {name: latest_job_id(job) for name, job in jobs.items()}
    own = {name: read_own_status(job["kind"], Path(job["run_dir"])) for name, job in jobs.items()}
    undecided = [
        job_id
        for name, job_id in last_id.items()
        if job_id
        and queue is not None
        and job_id not in queue
        and (own[name] or {}).get("state") not in FINAL
    ]
    accounting = sacct_states(undecided)
    states = {name: resolve(own[name], last_id[name], queue, accounting) for name in jobs}
    for name, job in jobs.items():  # another name of a planned run: that run's state
        twin = job.get("same_as")
        if twin in states:
            states[name] = JobState(states[twin].state, f"same run as {twin}", states[twin].status)
    return states
