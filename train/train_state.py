"""`TrainState`: everything of a run that survives a restart, and the one place a checkpoint's
keys are written and read.

A checkpoint holds model, optimizer, gradient scaler, noise-scale EMAs, run counters, the step
and, derived from it, tokens, data position (the next sample) and schedule phase, the lr of the
last step, every rank's RNG states, whether the run finished, and the W&B run id. Resuming at
step k needs only k (the schedule lays the whole run out from the config); the stored data
position and phase are compared with the layout so that a changed layout is refused rather than
silently continued.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from train.noise import NoiseScale
from train.schedule import Layout

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Counters:
    """Run totals that survive restarts."""

    clipped_steps: int = 0
    device_seconds: float = 0.0  # wall time x devices, over every segment of the run


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch, CUDA (where present), numpy, python."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The model and everything else that decides the next step; `step` steps are done."""

    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise: NoiseScale
    layout: Layout
    run_id: str  # the run's signature: its W&B run id too
    counters: Counters
    step: int = 0
    finished: bool = False  # the last step is done and the final checkpoint written

    @property
    def tokens(self) -> int:
        return self.layout.tokens_after(self.step - 1)

    def state_dict(self, rngs: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        """The checkpoint; `rngs` holds every rank's RNG states (rank order), `lr` the last step's."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "noise_scale": self.noise.state_dict(),
            "counters": asdict(self.counters),
            "step": self.step,
            "tokens": self.tokens,
            "samples": self.tokens // self.layout.seq_len,  # data position: the next sample
            "phase": self._phase(self.step),  # schedule position (halvings / Seesaw doublings passed)
            "lr": lr,
            "rng": rngs,
            "final": self.finished,
            "signature": self.run_id,
            "wandb_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        """Continue from a checkpoint of this run, taking `rank`'s own RNG streams (or rank 0's
        where the checkpoint was written by fewer ranks)."""
        step = int(state["step"])
        expected = (self._phase(step), self.layout.tokens_after(step - 1) // self.layout.seq_len)
        if (state.get("phase", 0), state["samples"]) != expected:
            raise ValueError(
                f"checkpoint at step {step} is at phase/sample {state.get('phase', 0)}/"
                f"{state['samples']} but this run's schedule puts that step at {expected[0]}/{expected[1]}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.noise.load_state_dict(state["noise_scale"])
        self.counters = Counters(**state["counters"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        self.step = step
        self.finished = bool(state.get("final"))

    def _phase(self, step: int) -> int:
        return int(self.layout.phase[step - 1]) if step > 0 else 0
