"""Each arm run as the comparison needs it, and what stands beside every verdict: its regime
against the gradient noise scale, its per-arm context (`arms.csv`) and its binned curve (`bins.csv`).

B_noise is B_simple of McCandlish et al. (2018): the batch at which gradient noise equals signal.
Well below it a step is noise-dominated, the regime the square-root rule assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.collect import ArmRows
from analysis.options import BinSpec
from analysis.paired import LoggedSteps, successive_noise


@dataclass
class Arm:
    """One run of an arm as the tables need it: identity, its logged series, and context."""

    name: str  # the job name (e.g. `A[trainer.data_seed=1]`)
    base: str  # the arm a pair names (`A`)
    variant: str  # the other overrides the sweep varies for it (`experiment.ratio=16`); "" for none
    replicate: str  # its data-order replicate (`data_seed=1,init_seed=0`); "" when the sweep has one
    batch: int
    state: str
    tokens: int  # the furthest token count it logged
    steps: LoggedSteps
    val_tokens: np.ndarray
    val_loss: np.ndarray
    val_sequences: dict[int, np.ndarray] = field(default_factory=dict)  # tokens -> per-sequence losses
    loss_std: float = math.nan  # per-step training-loss noise over the compared range
    b_simple: float = math.nan  # median of the trainer's smoothed B_simple over the compared range
    b_noise: float = math.nan  # sum tr(Sigma) / sum |G|^2 over the compared range's measured steps
    seq_len: int = 0  # tokens per sequence: B_noise in tokens is b_noise * seq_len
    tokens_per_s: float = math.nan
    gpu_hours: float = math.nan
    branch: str = ""  # the weights it started from (`warmup:<signature>`); "" where not recorded
    branch_tokens: float = math.nan  # tokens its branch point was trained on (experiment.branch_from)


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else math.nan


def noise_scale(noise_trace: np.ndarray, grad_sq: np.ndarray) -> float:
    """B_noise (sequences) over a window: the ratio of the summed per-step estimates, each unbiased,
    as McCandlish et al. (2018, App. A) advise, not a mean or median of per-step ratios (a ratio
    of two noisy numbers whose denominator can be negative). NaN where nothing was measured or
    the summed |G|^2 is not positive (the window is too short to resolve the signal)."""
    both = np.isfinite(noise_trace) & np.isfinite(grad_sq)
    signal = float(grad_sq[both].sum())
    return float(noise_trace[both].sum()) / signal if both.any() and signal > 0 else math.nan


def _seq_len(steps: np.ndarray, tokens: np.ndarray, batch: int) -> int:
    """Tokens per sequence, from the first logged step (which runs at the arm's first batch size)."""
    return int(tokens[0] // (steps[0] * batch)) if len(steps) and steps[0] > 0 and batch > 0 else 0


def regime(batch: float, b_noise: float) -> str:
    """Where a batch stands against the noise scale (McCandlish et al. 2018): well below it the
    gradient noise dominates each step, the regime the SDE view of Adam (and so the square-root
    rule, Malladi et al. 2022) assumes; at and beyond it, steps are limited by curvature and
    larger batches buy less."""
    if not (math.isfinite(b_noise) and b_noise > 0):
        return "unmeasured"
    ratio = batch / b_noise
    return (
        "noise-dominated"
        if ratio < REGIME_EDGES[0]
        else "near B_noise"
        if ratio < REGIME_EDGES[1]
        else "beyond B_noise"
    )


REGIME_EDGES = (0.25, 1.0)  # B / B_noise: below 1/4 noise-dominated; at 1 noise equals signal


def arms_of(runs: pd.DataFrame, spec: BinSpec, found: dict[str, ArmRows]) -> dict[str, Arm]:
    """Split the long table (sorted by arm, kind, tokens) into arms, one pass; `found` (the runs as
    their source read them, by name) adds their per-sequence validation losses and branch point."""
    out = {}
    for name, df in runs.groupby("arm", sort=True, observed=True):
        kind = df["kind"].to_numpy()
        tokens = df["tokens"].to_numpy(np.int64)
        loss = df["loss"].to_numpy(np.float64)
        train, val = kind == "train", kind == "val"
        window = train & (tokens > spec.skip_tokens)
        if spec.until_tokens:
            window &= tokens <= spec.until_tokens
        out[str(name)] = Arm(
            name=str(name),
            base=str(df["base"].iloc[0]),
            variant=str(df["variant"].iloc[0]),
            replicate=str(df["replicate"].iloc[0]),
            batch=int(df["batch_size"].iloc[0]),
            state=str(df["state"].iloc[0]),
            tokens=int(tokens.max()),
            steps=LoggedSteps.of(df["step"].to_numpy(np.int64)[train], tokens[train], loss[train]),
            val_tokens=tokens[val],
            val_loss=loss[val],
            val_sequences=found[str(name)].val_sequences if str(name) in found else {},
            loss_std=successive_noise(loss[window]),
            b_simple=_median(df["b_simple"].to_numpy(np.float64)[window]),
            b_noise=noise_scale(
                df["noise_trace"].to_numpy(np.float64)[window], df["grad_sq"].to_numpy(np.float64)[window]
            ),
            seq_len=_seq_len(
                df["step"].to_numpy(np.int64)[train], tokens[train], int(df["batch_size"].iloc[0])
            ),
            tokens_per_s=_median(df["tokens_per_s"].to_numpy(np.float64)[window]),
            gpu_hours=float(np.nanmax(df["gpu_hours"].to_numpy(np.float64), initial=-np.inf)),
            branch=found[str(name)].branch if str(name) in found else "",
            branch_tokens=found[str(name)].branch_tokens if str(name) in found else math.nan,
        )
    return out


def arm_context(arms: dict[str, Arm]) -> pd.DataFrame:
    """Per arm run: batch, replicate, state, tokens reached, per-step loss noise, B_simple, speed, cost."""
    rows = [
        {
            "arm": a.name,
            "base": a.base,
            "variant": a.variant,
            "replicate": a.replicate,
            "batch_size": a.batch,
            "seq_len": a.seq_len,
            "state": a.state,
            "tokens": a.tokens,
            "loss_std": a.loss_std,
            "b_noise": a.b_noise,
            "b_noise_tokens": a.b_noise * a.seq_len if a.seq_len else math.nan,
            "b_over_noise": a.batch / a.b_noise,
            "regime": regime(a.batch, a.b_noise),
            "b_simple": a.b_simple,
            "tokens_per_s": a.tokens_per_s,
            "gpu_hours": a.gpu_hours,
            "branch_tokens": a.branch_tokens,
        }
        for a in arms.values()
    ]
    return pd.DataFrame(rows, columns=ARMS_CSV_COLUMNS)


ARMS_CSV_COLUMNS = [
    "arm",
    "base",
    "variant",
    "replicate",
    "batch_size",
    "seq_len",
    "state",
    "tokens",
    "loss_std",
    "b_noise",
    "b_noise_tokens",
    "b_over_noise",
    "regime",
    "b_simple",
    "tokens_per_s",
    "gpu_hours",
    "branch_tokens",
]


def curve_bins(arms: dict[str, Arm], spec: BinSpec) -> pd.DataFrame:
    """Every arm's training loss on one grid of exact integer edges up to the furthest arm
    (`bins.csv`, the curves plot): per bin the mean step loss and its SE (successive-difference
    noise over rows)."""
    ends = [int(a.steps.end[-1]) for a in arms.values() if len(a.steps.end)]
    if not ends:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    lo, hi = spec.skip_tokens, max(ends)
    if spec.bin_tokens:  # a last piece shorter than half a bin joins the bin before it
        edges = np.arange(lo, hi, spec.bin_tokens, dtype=np.int64)
        edges = np.append(
            edges[:-1] if len(edges) > 1 and hi - edges[-1] < spec.bin_tokens / 2 else edges, hi
        )
    else:
        edges = np.unique(np.round(np.linspace(lo, hi, spec.bins + 1)).astype(np.int64))
    frames = []
    for arm in arms.values():
        end, loss = arm.steps.end, arm.steps.loss
        inside = end > lo
        which = np.searchsorted(edges, end[inside], side="left") - 1
        for i in np.unique(which):
            y = loss[inside][which == i]
            frames.append(
                {
                    "arm": arm.name,
                    "bin": int(i),
                    "bin_start": int(edges[i]),
                    "bin_end": int(edges[i + 1]),
                    "mean": float(y.mean()),
                    "n": len(y),
                    "se": successive_noise(y) / math.sqrt(len(y)) if len(y) > 2 else math.nan,
                }
            )
    return pd.DataFrame(frames, columns=CURVE_COLUMNS)


CURVE_COLUMNS = ["arm", "bin", "bin_start", "bin_end", "mean", "n", "se"]
