"""Learning-rate and batch-size schedules over tokens: constant, step decay, and the Seesaw ramp.

A base schedule divides lr by 2 at given token counts ("halvings"): `step_decay` at
`halve_at` x budget, or a cosine decay approximated by halvings (`cosine_halvings` = n: at the
tokens where lr0 / 2 (1 + cos(pi t / T)) crosses lr0 / 2^k, k = 1..n). Seesaw (Meterez et al.
2025) replaces each halving by lr x 1/sqrt(2) and batch x 2: the same progress in fewer serial
steps where the batch is below the critical batch size.

The whole run is laid out before the first step (`layout`): per step its batch, lr factor and the
samples it reads. A new phase starts at the first step boundary at or past its halving, and step k
reads samples [offset_k, offset_k + batch_k), offset_k being the samples all earlier steps read:
the token stream is the same one every arm reads, whatever the batch does. Resuming at step k
needs only k (the layout is a function of the config), and the checkpoint stores the phase and
offset so that a changed layout is caught rather than silently continued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("constant", "step_decay", "seesaw")


@dataclass
class ScheduleConfig:
    kind: str = "constant"  # constant | step_decay | seesaw
    halve_at: list[float] = field(default_factory=list)  # fractions of the budget where lr halves
    cosine_halvings: int = 0  # >0: halvings where a cosine decay over the budget crosses lr0 / 2^k


class ScheduleError(ValueError):
    """A schedule that cannot be laid out in whole steps."""


def halvings(cfg: ScheduleConfig, budget: int) -> list[float]:
    """Token counts where the base schedule divides lr by 2, increasing."""
    if cfg.kind not in KINDS:
        raise ScheduleError(f"schedule {cfg.kind!r}: expected one of {', '.join(KINDS)}")
    if cfg.kind == "constant":
        return []
    if cfg.halve_at and cfg.cosine_halvings:
        raise ScheduleError("give schedule.halve_at or schedule.cosine_halvings, not both")
    if cfg.cosine_halvings:
        # lr0 (1 + cos(pi t/T)) / 2 = lr0 2^-k  <=>  t = T arccos(2^(1-k) - 1) / pi
        return [budget * math.acos(2.0 ** (1 - k) - 1) / math.pi for k in range(1, cfg.cosine_halvings + 1)]
    points = sorted(cfg.halve_at)
    if not points or points[0] <= 0 or points[-1] >= 1:
        raise ScheduleError(f"schedule.halve_at={cfg.halve_at}: give fractions of the budget in (0, 1)")
    return [p * budget for p in points]


@dataclass(frozen=True)
class Layout:
    """Per step: global batch (sequences), lr factor, phase, first sample; and the token totals."""

    batch: Any  # numpy arrays, one entry per step
    lr_factor: Any
    phase: Any
    offset: Any  # samples read before the step
    seq_len: int

    @property
    def steps(self) -> int:
        return len(self.batch)

    def tokens_after(self, step: int) -> int:
        """Tokens consumed once step `step` (0-based) is done; 0 for step -1."""
        if step < 0:
            return 0
        return int(self.offset[step] + self.batch[step]) * self.seq_len


def layout(cfg: ScheduleConfig, batch_size: int, seq_len: int, budget: int) -> Layout:
    """Lay the run out in steps; raises ScheduleError when the budget is not a whole number of them."""
    import numpy as np  # here, not at module level: `import sweep` (via ScheduleConfig) stays light

    cuts = halvings(cfg, budget)
    batches, factors, phases, offsets = [], [], [], []
    samples, phase = 0, 0
    while samples * seq_len < budget:
        while phase < len(cuts) and samples * seq_len >= cuts[phase]:
            phase += 1
        seesaw = cfg.kind == "seesaw"
        batch = batch_size * 2**phase if seesaw else batch_size
        factor = 2.0 ** (-phase / 2) if seesaw else 2.0**-phase
        batches.append(batch)
        factors.append(factor)
        phases.append(phase)
        offsets.append(samples)
        samples += batch
    if samples * seq_len != budget:
        raise ScheduleError(
            f"the {cfg.kind} schedule does not end on the token budget {budget}: its last step (batch "
            f"{batches[-1]}) ends at {samples * seq_len}; choose a budget or halving points on whole steps"
        )
    return Layout(np.array(batches), np.array(factors), np.array(phases), np.array(offsets), seq_len)
