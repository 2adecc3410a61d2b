"""The gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", App. A), from gradient norms the step computes anyway.

With |G_small|^2 the squared norm of a gradient averaged over B_small samples and |G_big|^2 that
over B_big samples (independent samples, the same weights), unbiased estimates of the true
gradient's squared norm and of the trace of the per-sample gradient covariance are

    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and B_simple = S / |G|^2. Each is noisy for one step, so both are smoothed with an EMA before
taking the ratio (the ratio of the averages, as the paper recommends, not the average of ratios);
the per-step S and |G|^2 are logged too, so the analysis can take the same ratio over any window.

Units: batch sizes are in sequences (the unit of `batch_size`), so B_simple is in sequences;
times the sequence length it is in tokens. B_simple is the batch at which the gradient's noise
equals its signal: well below it the noise dominates, the regime where the square-root rule is
expected to hold (Malladi et al. 2022).

Where the two batch sizes come from depends on the step's layout (`train.loop.launch_step`):
- DDP: each rank's own gradient (B / world) against the all-reduced one (B);
- one process with accumulation: the first micro-batch's gradient against the step's;
- one process, one micro-batch (the small-batch arms, batch 1 included): every
  `trainer.noise_probe_every` steps, a *probe*: one extra forward and backward at the step's
  weights on the next step's B samples. The step's gradient and the probe's are two independent
  batches of B at the same weights; with small = (|G_1|^2 + |G_2|^2) / 2 (B) and
  big = |G_1 + G_2|^2 / 4 (2B) the formulas above apply, and |G|^2 reduces to G_1 . G_2.
  The probe leaves the step's gradient untouched (the update is bit-identical) and costs
  1 / noise_probe_every of the arm's compute.

Pairing a step's gradient with the *previous* step's instead would cost nothing, but the
previous step's noise moved the weights the current gradient is taken at: E[G_t . G_{t-1}]
is then |G|^2 - lr tr(H P Sigma) / B, a bias that grows with B_simple / B, i.e. exactly in the
noise-dominated regime (+30% on B_simple at batch 1 on a quadratic at lr 0.01).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NoiseSample:
    """One step's two gradient norms: a mean over `b_small` sequences and over `b_big`."""

    small_sq: float
    b_small: int
    big_sq: float
    b_big: int

    def estimates(self) -> tuple[float, float]:
        """This step's unbiased (|G|^2, S): the true gradient's squared norm and tr(Sigma)."""
        small, big = self.b_small, self.b_big
        if not big > small > 0:
            raise ValueError(f"need 0 < B_small < B_big, got {small} and {big}")
        signal = (big * self.big_sq - small * self.small_sq) / (big - small)
        noise = (self.small_sq - self.big_sq) / (1.0 / small - 1.0 / big)
        return signal, noise


@dataclass
class NoiseScale:
    decay: float = 0.95
    signal: float = 0.0  # EMA of |G|^2
    noise: float = 0.0  # EMA of S
    updates: int = 0
    last_signal: float | None = None  # the latest step's own estimates, before smoothing
    last_noise: float | None = None

    def update(self, sample: NoiseSample) -> None:
        signal, noise = sample.estimates()
        # Both EMAs start at zero; their bias corrections (1 - decay**n) are equal and cancel in the ratio.
        self.updates += 1
        self.signal = self.decay * self.signal + (1 - self.decay) * signal
        self.noise = self.decay * self.noise + (1 - self.decay) * noise
        self.last_signal, self.last_noise = signal, noise

    def skip(self) -> None:
        """A step without a sample (between probes, an fp16 overflow step): nothing to log."""
        self.last_signal = self.last_noise = None

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
        self.last_signal, self.last_noise = state.get("last_signal"), state.get("last_noise")
