"""Hydra's basic sweeper without its up-front pass that composes every job once more.

The launcher composes and validates every job before anything runs, so the basic sweeper's own
check (a full composition per job) only doubled the time to plan a large sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ArmSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Left to the launcher, which composes and checks every job of the batch."""
