"""Pairwise comparison of arms on a common token grid, with the statistics a reviewer asks for.

Per pair (a, b), both arms are cut into the same token bins (a row's `tokens` is the count consumed
when it was logged; bin i holds rows with edges[i] < tokens <= edges[i+1]). The grid runs from
`skip_tokens` to the last token both arms reached (or `until_tokens`), so an arm that crashed
midway is compared on what it has.

Per bin: each arm's mean loss; its per-step noise, the standard deviation of successive
differences / sqrt(2) (a loss curve's drift between adjacent steps is negligible against its
batch noise, so this measures the noise without the trend that a plain within-bin std would add);
the mean's standard error noise / sqrt(rows); the gap a - b and its SE sqrt(se_a^2 + se_b^2)
(independent noise: conservative, as arms fed the same tokens have positively correlated noise).

Over bins: the mean gap, its SE (std of the per-bin gaps / sqrt(bins): it carries both noise and
any systematic drift of the gap), t, the share of bins with the sign of the mean (directional
consistency, how the seed study judged its ~0.0005-nat effects), max |gap|, and an equivalence
test (TOST: two one-sided t-tests against +-delta on bins - 1 degrees of freedom; equivalent when
the 1 - 2 alpha confidence interval of the mean gap lies inside +-delta).

The yardstick is the spread between operating points: |mean gap| between arms of different pairs
at the same batch size (A vs J, H vs B in the seed study). A rule maps one batch size onto another
when a pair's gap is small against it; delta defaults to a fraction of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class BinSpec:
    bins: int = 20  # bins over the compared token range (when bin_tokens is 0)
    bin_tokens: int = 0  # fixed bin width in tokens; 0 = range / bins
    skip_tokens: int = 0  # leave out rows at or below this many tokens (e.g. the branch transient)
    until_tokens: int = 0  # leave out rows above this many tokens; 0 = up to the common end


@dataclass
class Margin:
    nats: float = 0.0  # equivalence margin delta in nats; 0 = `fraction` x the operating-point spread
    fraction: float = 0.25
    alpha: float = 0.05  # TOST level: equivalent when the (1 - 2 alpha) CI lies inside +-delta


@dataclass
class Series:
    """One arm's rows of one kind, sorted by tokens."""

    tokens: np.ndarray
    loss: np.ndarray

    @property
    def end(self) -> int:
        return int(self.tokens[-1]) if len(self.tokens) else 0


def series_by_arm(runs: pd.DataFrame, kind: str) -> dict[str, Series]:
    rows = runs[runs["kind"] == kind]
    return {
        str(arm): Series(df["tokens"].to_numpy(np.int64), df["loss"].to_numpy(np.float64))
        for arm, df in rows.groupby("arm", sort=True)
    }


def noise_std(loss: np.ndarray) -> float:
    """Per-step noise: std of successive differences / sqrt(2); NaN with fewer than 3 rows."""
    if len(loss) < 3:
        return float("nan")
    return float(np.std(np.diff(loss), ddof=1) / math.sqrt(2))


def grid(ends: list[int], spec: BinSpec, bins: int | None = None) -> np.ndarray:
    """Bin edges from `skip_tokens` to min(ends) (capped by `until_tokens`)."""
    end = min(ends)
    if spec.until_tokens:
        end = min(end, spec.until_tokens)
    if end <= spec.skip_tokens:
        return np.array([float(spec.skip_tokens)])
    width = spec.bin_tokens or (end - spec.skip_tokens) / (bins or spec.bins)
    edges = np.arange(spec.skip_tokens, end + width * 0.5, width, dtype=np.float64)
    edges[-1] = max(edges[-1], end)
    return edges


def bin_series(s: Series, edges: np.ndarray) -> pd.DataFrame:
    """Per non-empty bin: mean, rows, per-step noise and the mean's SE."""
    nb = len(edges) - 1
    inside = (s.tokens > edges[0]) & (s.tokens <= edges[-1])
    t, y = s.tokens[inside], s.loss[inside]
    idx = np.clip(np.searchsorted(edges, t, side="left") - 1, 0, max(nb - 1, 0))
    n = np.bincount(idx, minlength=nb).astype(np.float64)
    mean = np.bincount(idx, weights=y, minlength=nb) / np.maximum(n, 1)
    # Successive differences inside each bin: variance of d (ddof=1) per bin, then / 2.
    same = idx[1:] == idx[:-1]
    d, di = np.diff(y)[same], idx[1:][same]
    m = np.bincount(di, minlength=nb).astype(np.float64)
    d_sum = np.bincount(di, weights=d, minlength=nb)
    d_sq = np.bincount(di, weights=d * d, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (d_sq - d_sum**2 / m) / (m - 1)
        noise = np.where(m >= 2, np.sqrt(np.maximum(var, 0.0) / 2), np.nan)
        se = noise / np.sqrt(n)
    keep = n > 0
    bins = np.arange(nb)[keep]
    return pd.DataFrame(
        {
            "bin": bins,
            "bin_start": edges[:-1][keep],
            "bin_end": edges[1:][keep],
            "mean": mean[keep],
            "n": n[keep].astype(np.int64),
            "noise": noise[keep],
            "se": se[keep],
        }
    )


def bin_arms(runs: pd.DataFrame, spec: BinSpec, kind: str = "train") -> pd.DataFrame:
    """Every arm on one grid up to the furthest arm (for `bins.csv` and the curves plot)."""
    series = series_by_arm(runs, kind)
    if not series:
        return pd.DataFrame(columns=["arm", "bin", "bin_start", "bin_end", "mean", "n", "noise", "se"])
    edges = grid([max(s.end for s in series.values())], spec)
    frames = [bin_series(s, edges).assign(arm=arm) for arm, s in series.items()]
    return pd.concat(frames, ignore_index=True)[
        ["arm", "bin", "bin_start", "bin_end", "mean", "n", "noise", "se"]
    ]


def pair_bins(a: Series, b: Series, spec: BinSpec, kind: str = "train") -> pd.DataFrame:
    """Per bin both arms have rows in: means, SEs, gap a - b and its SE."""
    bins = spec.bins
    if kind == "val":  # evaluations are sparse: at most one bin per common evaluation point
        common = np.intersect1d(a.tokens[a.tokens > spec.skip_tokens], b.tokens[b.tokens > spec.skip_tokens])
        bins = max(1, min(spec.bins, len(common)))
    edges = grid([a.end, b.end], spec, bins)
    left = bin_series(a, edges).set_index("bin")
    right = bin_series(b, edges).set_index("bin")
    both = left.join(right, how="inner", lsuffix="_a", rsuffix="_b")
    out = pd.DataFrame(
        {
            "bin": both.index,
            "bin_start": both["bin_start_a"],
            "bin_end": both["bin_end_a"],
            "mean_a": both["mean_a"],
            "mean_b": both["mean_b"],
            "n_a": both["n_a"],
            "n_b": both["n_b"],
            "gap": both["mean_a"] - both["mean_b"],
            "gap_se": np.sqrt(both["se_a"] ** 2 + both["se_b"] ** 2),
        }
    )
    return out.reset_index(drop=True)


def summarize_gap(gap: np.ndarray, delta: float = float("nan"), alpha: float = 0.05) -> dict[str, Any]:
    """Statistics over bins of per-bin gaps, and the TOST verdict against +-delta."""
    n = len(gap)
    nan = float("nan")
    mean = float(np.mean(gap)) if n else nan
    se = float(np.std(gap, ddof=1) / math.sqrt(n)) if n > 1 else nan
    out: dict[str, Any] = {
        "bins": n,
        "mean_gap": mean,
        "gap_se": se,
        "t": mean / se if se > 0 else (math.copysign(math.inf, mean) if se == 0 and mean else nan),
        "same_sign": float(np.mean(np.sign(gap) == np.sign(mean))) if n else nan,
        "max_abs_gap": float(np.max(np.abs(gap))) if n else nan,
        "delta": delta,
        "alpha": alpha,
        "ci_low": nan,
        "ci_high": nan,
        "tost_p": nan,
        "verdict": "no verdict",
    }
    if n < 2 or not np.isfinite(se):
        out["verdict"] = "no verdict: fewer than 2 bins"
        return out
    q = float(stats.t.ppf(1 - alpha, n - 1))
    out["ci_low"], out["ci_high"] = mean - q * se, mean + q * se
    if not (np.isfinite(delta) and delta > 0):
        out["verdict"] = "no verdict: no margin"
        return out
    if se == 0:
        p = 0.0 if abs(mean) < delta else 1.0
    else:
        p = max(
            1 - float(stats.t.cdf((mean + delta) / se, n - 1)), float(stats.t.cdf((mean - delta) / se, n - 1))
        )
    out["tost_p"] = p
    if p < alpha:
        out["verdict"] = "equivalent"
    elif out["ci_low"] > delta or out["ci_high"] < -delta:
        out["verdict"] = "not equivalent"
    else:
        out["verdict"] = "inconclusive"
    return out


def arm_context(runs: pd.DataFrame, spec: BinSpec) -> pd.DataFrame:
    """Per arm over the window: batch, state, tokens reached, per-step loss noise, B_simple, speed, cost."""
    rows = runs[(runs["kind"] == "train") & (runs["tokens"] > spec.skip_tokens)]
    if spec.until_tokens:
        rows = rows[rows["tokens"] <= spec.until_tokens]
    out = []
    for arm, df in rows.groupby("arm", sort=True):
        out.append(
            {
                "arm": arm,
                "batch_size": int(df["batch_size"].iloc[0]),
                "state": df["state"].iloc[0],
                "tokens": int(runs.loc[runs["arm"] == arm, "tokens"].max()),
                "loss_std": noise_std(df["loss"].to_numpy(np.float64)),
                "b_simple": float(df["b_simple"].median()),
                "tokens_per_s": float(df["tokens_per_s"].median()),
                "gpu_hours": float(df["gpu_hours"].max()),
            }
        )
    return pd.DataFrame(
        out,
        columns=["arm", "batch_size", "state", "tokens", "loss_std", "b_simple"]
        + ["tokens_per_s", "gpu_hours"],
    )


def op_spreads(
    series: dict[str, Series], pairs: list[list[str]], batch: dict[str, int], spec: BinSpec
) -> dict[str, float]:
    """Per arm: mean |mean gap| to arms of other pairs at the same batch size (NaN if none)."""
    pair_of = {arm: i for i, pair in enumerate(pairs) for arm in pair}
    found: dict[str, list[float]] = {}
    for x, y in combinations(sorted(a for a in pair_of if a in series), 2):
        if batch.get(x) == batch.get(y) and pair_of[x] != pair_of[y]:
            gap = pair_bins(series[x], series[y], spec)["gap"].to_numpy()
            if len(gap):
                for arm in (x, y):
                    found.setdefault(arm, []).append(abs(float(gap.mean())))
    return {arm: float(np.mean(v)) for arm, v in found.items()}


def pair_table(
    runs: pd.DataFrame, pairs: list[list[str]], spec: BinSpec, margin: Margin, kind: str = "train"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per pair, the per-bin gaps of every pair) for `kind` rows."""
    series = series_by_arm(runs, kind)
    train_series = series if kind == "train" else series_by_arm(runs, "train")
    batch = {str(a): int(b) for a, b in runs.groupby("arm")["batch_size"].first().items()}
    spread = op_spreads(train_series, pairs, batch, spec)  # the yardstick is always on training loss
    context = arm_context(runs, spec).set_index("arm")
    rows, gaps = [], []
    for a, b in pairs:
        if a not in series or b not in series:
            continue
        bins = pair_bins(series[a], series[b], spec, kind)
        s = [spread[x] for x in (a, b) if x in spread]
        op_spread = float(np.mean(s)) if s else float("nan")
        delta = margin.nats or margin.fraction * op_spread
        stats_ = summarize_gap(bins["gap"].to_numpy(), delta, margin.alpha)
        small, large = sorted((a, b), key=lambda x: batch[x])
        std = {x: context.loc[x, "loss_std"] if x in context.index else float("nan") for x in (a, b)}
        rows.append(
            {
                "metric": kind,
                "pair": f"{a}-{b}",
                "a": a,
                "b": b,
                "batch_a": batch[a],
                "batch_b": batch[b],
                "from_tokens": float(bins["bin_start"].min()) if len(bins) else float("nan"),
                "to_tokens": float(bins["bin_end"].max()) if len(bins) else float("nan"),
                **stats_,
                "op_spread": op_spread,
                "gap_over_spread": abs(stats_["mean_gap"]) / op_spread if op_spread > 0 else float("nan"),
                "noise_ratio": std[small] / std[large] if std[large] > 0 else float("nan"),
                "sqrt_batch_ratio": math.sqrt(batch[large] / batch[small]),
            }
        )
        gaps.append(bins.assign(metric=kind, pair=f"{a}-{b}", delta=delta))
    table = pd.DataFrame(rows)
    return table, (pd.concat(gaps, ignore_index=True) if gaps else pd.DataFrame())


def verdict_line(row: dict[str, Any]) -> str:
    """A pair's verdict in words."""
    a, b, m, se, n = row["a"], row["b"], row["mean_gap"], row["gap_se"], row["bins"]
    side = "above" if m > 0 else "below" if m < 0 else "level with"
    facts = (
        f"mean gap {m:+.3g} ± {se:.2g} nats over {n} bins ({a} {side} {b} in {row['same_sign']:.0%} of them)"
        if n > 1
        else f"{n} bin(s) in common"
    )
    delta = row["delta"]
    ci = f"{1 - 2 * row['alpha']:.0%} CI [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]"
    verdict = row["verdict"]
    if verdict == "equivalent":
        head = f"equivalent within ±{delta:.3g} nats (TOST p = {row['tost_p']:.2g}, {ci})"
    elif verdict == "not equivalent":
        head = f"NOT equivalent: {a} is {side} {b} by more than the margin ±{delta:.3g} nats ({ci})"
    elif verdict == "inconclusive":
        head = (
            f"inconclusive: the {ci} reaches past the margin ±{delta:.3g} nats "
            f"(TOST p = {row['tost_p']:.2g}; more tokens or seeds would decide)"
        )
    elif verdict == "no verdict: no margin":
        head = "no verdict: no margin (no operating-point spread at these batch sizes; set analysis.margin)"
    else:
        head = verdict
    return f"{row['pair']} ({row['metric']}): {head}; {facts}."
