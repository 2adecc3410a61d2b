"""Hydra's basic sweeper, minus two things it does before our launcher can check the sweep: compose
every job once more (the launcher composes and checks them all), and write `multirun.yaml` into
the sweep dir (a refused sweep must leave nothing behind: it goes to a scratch dir instead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ArmSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Left to the launcher, which composes and checks every job of the batch."""

    def sweep(self, arguments: list[str]) -> Any:
        from sweep.compose import scratch_sweep_dir

        assert self.config is not None
        with scratch_sweep_dir(self.config):
            return super().sweep(arguments)
