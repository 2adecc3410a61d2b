"""The callable submitit runs in every task of a job: one stage of a study.

It turns the submitit job environment into the standard torch distributed variables, records
where it runs (job id, nodes, restarts), hands a plain config to `train/`, and requeues the job
when the trainer stopped on SLURM's warning signal. The trainer never sees submitit or SLURM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config import DataConfig, RunConfig


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


@dataclass
class StageJob:
    """`prepare` (tokenize the data) or `train` (the warmup or an arm), run in a submitit job."""

    kind: str
    data: DataConfig | None = None
    run: RunConfig | None = None
    max_requeues: int = 3
    # Intra-op threads per task; 0: from the CPUs the job was given (`job_threads`). The local
    # launcher sets it when it runs jobs side by side. The thread count never changes a result
    # (tests/test_trainer.py), so it is not part of any run's identity.
    threads: int = 0

    def __call__(self) -> Any:
        export_distributed_env()
        if self.kind == "prepare":
            from train.data import prepare

            assert self.data is not None
            return str(prepare(self.data, progress=True))
        from train.loop import Stopped, train

        assert self.run is not None
        import torch

        torch.set_num_threads(self.threads or job_threads())
        self.run.launch = {**launch_info(), "threads": torch.get_num_threads()}
        try:
            summary = train(self.run)
        except Stopped as stopped:
            if stopped.signum == signal.SIGUSR2 and "SLURM_JOB_ID" in os.environ:
                self._requeue()
            raise
        # The work is done: a time-limit warning arriving now must neither kill the job (SLURM
        # would call it FAILED and break `afterok` chains) nor requeue it.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint protocol, for a signal that comes before training installed its own
        handler (while starting up): nothing to save yet, so just resubmit the same job; it resumes
        from the newest checkpoint on disk. Writes nothing from inside the signal handler."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _requeue(self) -> None:
        """Put the job back in the queue (rank 0 only); it resumes from the checkpoint just written."""
        assert self.run is not None
        if os.environ.get("RANK", "0") != "0":
            return
        from train.status import RunState, set_state

        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            print(f"not requeued: {restarts} restarts already (max {self.max_requeues})", file=sys.stderr)
            return
        job_id = os.environ["SLURM_JOB_ID"]
        if "SLURM_ARRAY_JOB_ID" in os.environ:
            job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        set_state(self.run.run_dir, RunState.REQUEUED)
        print(
            f"requeueing job {job_id} (restart {restarts + 1} of at most {self.max_requeues})",
            file=sys.stderr,
        )
        subprocess.run(["scontrol", "requeue", job_id], check=False)
