"""The Hydra Launcher of `python -m sweep ... -m`: a thin shell around `sweep.compose.launch`.

Hydra instantiates launchers only from the `hydra_plugins` namespace, so the class lives here;
all logic is in `sweep/`. Unlike hydra-submitit-launcher, the SLURM executor returns as soon as
the jobs are submitted, and every arm is validated before the first one is queued.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SweepLauncher(Launcher):
    def __init__(self, **options: object) -> None:
        self.options = options  # sweep.launch.LauncherOptions: executor, max_parallel, poll_s, analyze
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweep.compose import launch

        assert self.config is not None and self.hydra_context is not None
        return launch(self.hydra_context, self.config, job_overrides, self.options)
