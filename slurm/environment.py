"""What a job learns from where it runs, and what it asks of SLURM: the standard torch distributed
variables from the submitit job environment, its threads from the CPUs it was given, where it
runs (job id, nodes, restarts, the code's commit) and its own requeue. `sweep/stage.py`'s job
callable uses these; the trainer never sees submitit or SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def export_distributed_env() -> None:
    """Export RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK from the submitit job, if in one."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def job_threads(env: dict[str, str] | None = None, affinity: int | None = None) -> int:
    """Intra-op threads for each task of this job: the CPUs it was given, shared by its tasks.

    SLURM says per task (`SLURM_CPUS_PER_TASK`); elsewhere the CPUs this process may run on
    (its affinity), shared by the tasks started on this node (`LOCAL_WORLD_SIZE`, which submitit
    exports). Torch's default (every core it finds) oversubscribes a node that runs several jobs
    or ranks: its threads then wait on each other at every parallel region, and a step on a busy
    2-core machine took 10x as long as with one thread."""
    env = dict(os.environ) if env is None else env
    cpus = affinity if affinity is not None else len(os.sched_getaffinity(0))
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(int(env["SLURM_CPUS_PER_TASK"]), cpus))
    tasks = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    return max(1, cpus // max(tasks, 1))


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the project's own checkout (the code that runs)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def launch_info() -> dict[str, Any]:
    """Where this process runs and with which code, for status.json and the W&B config."""
    info: dict[str, Any] = {"restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "git": git_state()}
    for key, var in (
        ("job_id", "SLURM_JOB_ID"),
        ("array_job_id", "SLURM_ARRAY_JOB_ID"),
        ("array_task_id", "SLURM_ARRAY_TASK_ID"),
        ("nodelist", "SLURM_JOB_NODELIST"),
        ("local_job_id", "SUBMITIT_LOCAL_JOB_ID"),
    ):
        if var in os.environ:
            info[key] = os.environ[var]
    return info


def requeue(run_dir: str, max_requeues: int) -> None:
    """Put this job back in SLURM's queue (rank 0 only) after the run checkpointed on SLURM's
    warning signal; it resumes from that checkpoint. At most `max_requeues` times."""
    if os.environ.get("RANK", "0") != "0":
        return
    from records.run_status import RunState, set_state

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        print(f"not requeued: {restarts} restarts already (max {max_requeues})", file=sys.stderr)
        return
    job_id = os.environ["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    set_state(run_dir, RunState.REQUEUED)
    print(f"requeueing job {job_id} (restart {restarts + 1} of at most {max_requeues})", file=sys.stderr)
    subprocess.run(["scontrol", "requeue", job_id], check=False)
