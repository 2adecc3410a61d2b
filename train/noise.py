"""The gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", App. A), from gradient norms the step computes anyway.

With |G_small|^2 the squared norm of a gradient averaged over B_small samples and |G_big|^2 that
over B_big samples (same step, same weights), unbiased estimates of the true gradient's squared
norm and of the per-sample gradient variance's trace are

    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each is noisy for one step, so both are smoothed with an EMA before taking B_simple = S / |G|^2
(the ratio of the averages, as the paper recommends, not the average of ratios). The batch sizes
here are in sequences, the unit of `batch_size`: B_simple is the batch at which the noise in the
gradient equals its signal, so a batch well below it is in the noise-dominated regime where the
square-root rule is expected to hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class NoiseScale:
    decay: float = 0.95
    signal: float = 0.0  # EMA of |G|^2
    noise: float = 0.0  # EMA of S
    updates: int = 0

    def update(self, small_sq: float, b_small: int, big_sq: float, b_big: int) -> None:
        if not b_big > b_small > 0:
            raise ValueError(f"need 0 < B_small < B_big, got {b_small} and {b_big}")
        signal = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        noise = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
        # Both EMAs start at zero; their bias corrections (1 - decay**n) are equal and cancel in the ratio.
        self.updates += 1
        self.signal = self.decay * self.signal + (1 - self.decay) * signal
        self.noise = self.decay * self.noise + (1 - self.decay) * noise

    @property
    def b_simple(self) -> float | None:
        """S / |G|^2 from the smoothed estimates; None before the first update or while |G|^2 <= 0."""
        if self.updates == 0 or self.signal <= 0:
            return None
        return self.noise / self.signal

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.decay, self.signal, self.noise = state["decay"], state["signal"], state["noise"]
        self.updates = int(state["updates"])
