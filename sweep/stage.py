"""The callable every job of a sweep runs, in each of its tasks, under the local executor and
under SLURM alike: one stage of a study (tokenizing the data, the warmup or an arm).

It sets up the job from where it runs (slurm/environment.py), hands a plain config to `train/`,
and requeues the job when the trainer stopped on SLURM's warning signal.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from slurm.environment import export_distributed_env, job_threads, launch_info, requeue
from train.config import DataConfig, RunConfig


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
        decisions = None
        if self.run.stop.sweep_dir and self.kind == "train" and self.run.stage == "arm":
            from analysis.stopping import ArmLooks  # the looks read the partners' rows (pandas)

            decisions = ArmLooks(self.run.stop.sweep_dir, self.run.name, self.run.stop.poll_s)
        try:
            summary = train(self.run, decisions)
        except Stopped as stopped:
            if stopped.signum == signal.SIGUSR2 and "SLURM_JOB_ID" in os.environ:
                requeue(self.run.run_dir, self.max_requeues)
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
