"""The critical batch size of a batch-size ladder, two ways.

Branched (Merrill et al. 2025, "Critical batch size revisited", arXiv 2505.23971): from one
branch point, arms at batch k B (k = 1, 2, 4, ...) with the lr moved by a rule run a fixed token
window; the critical batch at that point is the largest batch whose loss at the window's end
stays within epsilon of the smallest batch's. "At the window's end" is the pair's last verdict
segment (the paired gap on the samples both consumed, with its robust CI: analysis/pairs.py),
so the critical batch comes with an interval: its low end is the largest batch (with every
smaller one) whose CI lies below epsilon, its high end the batch before the first whose CI lies
entirely above it. Several branch points are the ladder swept over warmups of several lengths
(`experiment.warmup.token_budget=...`): a shorter warmup is exactly the prefix of a longer one
(same data order, same seed, constant lr), so each is a checkpoint of one reference run; or over
checkpoints of the researcher's own run (`-m experiment.branch_from=/ckpt/10B,/ckpt/50B`), as
Merrill et al. branch from checkpoints of a pretraining run, each at the tokens it records.

McCandlish fit (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11):
to reach a given loss a run at batch B needs S steps and E = B S samples, with

    S = S_min (1 + B_crit / B),    E = E_min (1 + B / B_crit),    B_crit = E_min / S_min.

Per target loss, S is read off each ladder arm's binned loss curve (linear interpolation at the
first crossing) and (log S_min, log B_crit) fitted by least squares on log S (the noise of a
step count is relative); the CI is a residual bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats

CBS_COLUMNS = ["branch", "branch_tokens", "epsilon", "critical_batch", "critical_low", "critical_high"]
CBS_COLUMNS += ["b_noise", "batches", "arms"]
FIT_COLUMNS = ["branch", "target_loss", "b_crit", "b_crit_low", "b_crit_high", "s_min", "e_min", "points"]


def steps_to_target(bin_end: np.ndarray, mean: np.ndarray, target: float, tokens_per_step: int) -> float:
    """Steps (of `tokens_per_step` tokens) to the first crossing of `target` by a binned loss curve,
    interpolated linearly between bin ends; NaN if the curve never gets there."""
    below = np.flatnonzero(mean <= target)
    if not len(below):
        return math.nan
    i = int(below[0])
    if i == 0:
        tokens = float(bin_end[0])
    else:
        t0, t1, y0, y1 = float(bin_end[i - 1]), float(bin_end[i]), float(mean[i - 1]), float(mean[i])
        tokens = t0 + (t1 - t0) * (y0 - target) / (y0 - y1)
    return tokens / tokens_per_step


def fit_hyperbola(batches: np.ndarray, steps: np.ndarray) -> tuple[float, float]:
    """(S_min, B_crit) of S = S_min (1 + B_crit / B), least squares on log S."""
    b, s = np.asarray(batches, np.float64), np.asarray(steps, np.float64)
    # Start from the linear fit S = S_min + (S_min B_crit) / B.
    slope, intercept = np.polyfit(1.0 / b, s, 1)
    s0 = intercept if intercept > 0 else float(s.min())
    c0 = slope / s0 if slope > 0 else float(np.median(b))

    def residual(x: np.ndarray) -> np.ndarray:
        return np.log(s) - (x[0] + np.log1p(np.exp(x[1]) / b))

    fit = optimize.least_squares(residual, [math.log(s0), math.log(c0)])
    return float(np.exp(fit.x[0])), float(np.exp(fit.x[1]))


def bootstrap_b_crit(
    batches: np.ndarray, steps: np.ndarray, level: float = 0.9, draws: int = 400, seed: int = 0
) -> tuple[float, float]:
    """A residual-bootstrap `level` interval of B_crit: refit on the fitted curve times resampled
    relative residuals."""
    b, s = np.asarray(batches, np.float64), np.asarray(steps, np.float64)
    s_min, b_crit = fit_hyperbola(b, s)
    fitted = s_min * (1 + b_crit / b)
    residuals = np.log(s / fitted)
    residuals = residuals - residuals.mean()
    # Residuals of a 2-parameter fit are smaller than the noise: rescale by sqrt(n / (n - 2)).
    residuals *= math.sqrt(len(b) / max(len(b) - 2, 1))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        drawn = fitted * np.exp(rng.choice(residuals, size=len(b), replace=True))
        try:
            values.append(fit_hyperbola(b, drawn)[1])
        except (ValueError, np.linalg.LinAlgError):
            continue
    if not values:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def branch_of(variant: str, arms: pd.DataFrame | None = None) -> tuple[str, float]:
    """A sweep variant's label and its branch point in tokens: from experiment.warmup.token_budget,
    or what the checkpoint of experiment.branch_from records (its arms' `branch_tokens`)."""
    for part in variant.split(","):
        if "warmup.token_budget=" in part:
            return variant, float(part.split("=", 1)[1])
    if arms is not None and "branch_tokens" in arms and len(arms):
        recorded = arms.loc[arms["variant"] == variant, "branch_tokens"].dropna()
        if len(recorded):
            return variant or "branch_from", float(recorded.iloc[0])
    return variant or "warmup", math.nan


def _last_passing(
    points: list[dict[str, Any]], smallest: int, passes: Callable[[dict[str, Any]], bool]
) -> int:
    """The batch of the last point before the first that fails `passes` (`smallest` if the first fails)."""
    last = smallest
    for p in points:
        if not passes(p):
            break
        last = p["batch"]
    return last


def branched(
    pairs: pd.DataFrame, gaps: pd.DataFrame, arms: pd.DataFrame, ladder: list[str], epsilon: float
) -> pd.DataFrame:
    """Per branch point (sweep variant): the critical batch and its interval, with the smallest
    arm's B_noise over the window for comparison."""
    train = pairs[pairs["metric"] == "train"] if len(pairs) else pairs
    segments = gaps[(gaps["metric"] == "train") & (gaps["unit"] == "segment")] if len(gaps) else gaps
    rows = []
    first = ladder[0]
    variants: dict[str, list[dict[str, Any]]] = {}
    for row in train.to_dict("records"):
        if row["a"] != first or row["b"] not in ladder:
            continue
        name = str(row["pair"])
        variant = name.split("[", 1)[1][:-1] if "[" in name else ""
        last = segments[segments["pair"] == name].sort_values("bin_end").tail(1)
        if last.empty:
            continue
        seg = last.iloc[0]
        q = stats.t.ppf(1 - float(row["alpha"]), seg["gap_df"]) if seg["gap_df"] > 0 else math.nan
        half = q * float(seg["gap_se"])
        # The larger batch's loss minus the smallest batch's: positive when the larger one lags.
        gap = -float(seg["gap"])
        variants.setdefault(variant, []).append(
            {"batch": int(row["batch_b"]), "arm": row["b"], "low": gap - half, "high": gap + half}
        )
    for variant, points in sorted(variants.items()):
        points.sort(key=lambda p: p["batch"])
        smallest = int(train[train["a"] == first]["batch_a"].iloc[0])
        # Each: the largest batch of the ladder's unbroken run (from the smallest) that passes.
        sure = _last_passing(points, smallest, lambda p: p["high"] < epsilon)  # CI below epsilon
        maybe = _last_passing(points, smallest, lambda p: p["low"] <= epsilon)  # not surely beyond
        estimate = _last_passing(points, smallest, lambda p: (p["low"] + p["high"]) / 2 <= epsilon)
        label, tokens = branch_of(variant, arms)
        first_run = arms[(arms["base"] == first) & (arms["variant"] == variant)]
        rows.append(
            {
                "branch": label,
                "branch_tokens": tokens,
                "epsilon": epsilon,
                "critical_batch": estimate,
                "critical_low": sure,
                "critical_high": maybe,
                "b_noise": float(first_run["b_noise"].mean()) if len(first_run) else math.nan,
                "batches": " ".join(str(p["batch"]) for p in points),
                "arms": " ".join([first, *(p["arm"] for p in points)]),
            }
        )
    return pd.DataFrame(rows, columns=CBS_COLUMNS)


def mccandlish(
    bins: pd.DataFrame, arms: pd.DataFrame, ladder: list[str], targets: list[float], level: float = 0.9
) -> pd.DataFrame:
    """Per branch point and target loss: the fitted B_crit with its bootstrap CI, S_min and E_min
    (E in sequences: B is in sequences)."""
    rows = []
    ladder_runs = arms[arms["base"].isin(ladder)]
    for variant, runs in ladder_runs.groupby("variant", sort=True):
        curves = {r.arm: bins[bins["arm"] == r.arm].sort_values("bin_end") for r in runs.itertuples()}
        finals = [float(c["mean"].iloc[-1]) for c in curves.values() if len(c)]
        starts = [float(c["mean"].iloc[0]) for c in curves.values() if len(c)]
        if len(finals) < 3:
            continue
        chosen = targets or list(np.linspace(min(starts), max(finals), 5)[1:4])
        for target in chosen:
            b, s = [], []
            for r in runs.sort_values("batch_size").itertuples():
                c = curves[r.arm]
                if not len(c) or not r.seq_len:
                    continue
                steps = steps_to_target(
                    c["bin_end"].to_numpy(), c["mean"].to_numpy(), target, r.batch_size * r.seq_len
                )
                if math.isfinite(steps) and steps > 0:
                    b.append(r.batch_size)
                    s.append(steps)
            if len(b) < 3:
                continue
            s_min, b_crit = fit_hyperbola(np.array(b), np.array(s))
            lo, hi = bootstrap_b_crit(np.array(b), np.array(s), level)
            rows.append(
                {
                    "branch": branch_of(str(variant))[0],
                    "target_loss": float(target),
                    "b_crit": b_crit,
                    "b_crit_low": lo,
                    "b_crit_high": hi,
                    "s_min": s_min,
                    "e_min": s_min * b_crit,
                    "points": " ".join(f"{bb}:{ss:.4g}" for bb, ss in zip(b, s, strict=True)),
                }
            )
    return pd.DataFrame(rows, columns=FIT_COLUMNS)
