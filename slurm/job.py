"""The callable submitit runs in every task of a job: one stage of a study.

It turns the submitit job environment into the standard torch distributed variables, then hands
a plain config to `train/`. The trainer never sees submitit or SLURM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from train.config import DataConfig, RunConfig


def export_distributed_env() -> None:
    """Export RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK from the submitit job, if in one."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if env.world_size == 1:
        # A one-task job is a plain single process: no process group to set up.
        os.environ["WORLD_SIZE"] = "1"


@dataclass
class StageJob:
    """`prepare` (tokenize the data) or `train` (the warmup or an arm), run in a submitit job."""

    kind: str
    data: DataConfig | None = None
    run: RunConfig | None = None

    def __call__(self) -> Any:
        export_distributed_env()
        if self.kind == "prepare":
            from train.data import prepare

            assert self.data is not None
            return str(prepare(self.data, progress=True))
        from train.loop import train

        assert self.run is not None
        return train(self.run)
