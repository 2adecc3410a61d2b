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


@dataclass
class Arm:
    """An arm as the tables need it: identity, its train and validation series, and context."""

    name: str
    batch: int
    state: str
    tokens: int  # the furthest token count it logged
    train: Series
    val: Series
    loss_std: float  # per-step training-loss noise over the window (`noise_std`)
    b_simple: float  # median over the window
    tokens_per_s: float  # median over the window
    gpu_hours: float  # the last value

    def series(self, kind: str) -> Series:
        return self.train if kind == "train" else self.val


def arms_of(runs: pd.DataFrame, spec: BinSpec) -> dict[str, Arm]:
    """Split the long table (sorted by arm, kind, tokens) into arms, one pass."""
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
            batch=int(df["batch_size"].iloc[0]),
            state=str(df["state"].iloc[0]),
            tokens=int(tokens.max()),
            train=Series(tokens[train], loss[train]),
            val=Series(tokens[val], loss[val]),
            loss_std=noise_std(loss[window]),
            b_simple=float(np.nanmedian(df["b_simple"].to_numpy(np.float64)[window]))
            if window.any()
            else np.nan,
            tokens_per_s=float(np.nanmedian(df["tokens_per_s"].to_numpy(np.float64)[window]))
            if window.any()
            else np.nan,
            gpu_hours=float(np.nanmax(df["gpu_hours"].to_numpy(np.float64))) if len(df) else np.nan,
        )
    return out


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


@dataclass
class Binned:
    """One series on one grid: per bin (empty bins included) mean, rows, per-step noise, SE."""

    edges: np.ndarray
    mean: np.ndarray
    n: np.ndarray
    noise: np.ndarray
    se: np.ndarray

    def frame(self) -> pd.DataFrame:
        keep = self.n > 0
        return pd.DataFrame(
            {
                "bin": np.flatnonzero(keep),
                "bin_start": self.edges[:-1][keep],
                "bin_end": self.edges[1:][keep],
                "mean": self.mean[keep],
                "n": self.n[keep].astype(np.int64),
                "noise": self.noise[keep],
                "se": self.se[keep],
            }
        )


def bin_series(s: Series, edges: np.ndarray) -> Binned:
    nb = max(len(edges) - 1, 0)
    inside = (s.tokens > edges[0]) & (s.tokens <= edges[-1])
    t, y = s.tokens[inside], s.loss[inside]
    idx = np.clip(np.searchsorted(edges, t, side="left") - 1, 0, max(nb - 1, 0))
    n = np.bincount(idx, minlength=nb)[:nb].astype(np.float64)
    mean = np.bincount(idx, weights=y, minlength=nb)[:nb] / np.maximum(n, 1)
    # Successive differences inside each bin: variance of d (ddof=1) per bin, then / 2.
    same = idx[1:] == idx[:-1]
    d, di = np.diff(y)[same], idx[1:][same]
    m = np.bincount(di, minlength=nb)[:nb].astype(np.float64)
    d_sum = np.bincount(di, weights=d, minlength=nb)[:nb]
    d_sq = np.bincount(di, weights=d * d, minlength=nb)[:nb]
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (d_sq - d_sum**2 / m) / (m - 1)
        noise = np.where(m >= 2, np.sqrt(np.maximum(var, 0.0) / 2), np.nan)
        se = noise / np.sqrt(n)
    return Binned(edges, mean, n, noise, se)


BIN_COLUMNS = ["arm", "bin", "bin_start", "bin_end", "mean", "n", "noise", "se"]


def bin_arms(arms: dict[str, Arm], spec: BinSpec) -> pd.DataFrame:
    """Every arm's training loss on one grid up to the furthest arm (`bins.csv`, the curves plot)."""
    series = {name: arm.train for name, arm in arms.items() if len(arm.train.tokens)}
    if not series:
        return pd.DataFrame(columns=BIN_COLUMNS)
    edges = grid([max(s.end for s in series.values())], spec)
    frames = [bin_series(s, edges).frame().assign(arm=name) for name, s in series.items()]
    return pd.concat(frames, ignore_index=True)[BIN_COLUMNS]


class PairGrid:
    """Bins a pair of series on their common grid, remembering each series' binning per grid: arms
    with matched budgets share one grid, so comparing many pairs of them bins each arm once."""

    def __init__(self, spec: BinSpec) -> None:
        self.spec = spec
        self._memo: dict[tuple[int, bytes], Binned] = {}

    def _binned(self, s: Series, edges: np.ndarray) -> Binned:
        key = (id(s), edges.tobytes())
        if key not in self._memo:
            self._memo[key] = bin_series(s, edges)
        return self._memo[key]

    def common(self, a: Series, b: Series, kind: str = "train") -> tuple[Binned, Binned, np.ndarray]:
        """(a binned, b binned, mask of the bins both have rows in)."""
        spec, bins = self.spec, self.spec.bins
        if kind == "val":  # evaluations are sparse: at most one bin per common evaluation point
            skip = spec.skip_tokens
            bins = max(
                1, min(bins, len(np.intersect1d(a.tokens[a.tokens > skip], b.tokens[b.tokens > skip])))
            )
        edges = grid([a.end, b.end], spec, bins)
        x, y = self._binned(a, edges), self._binned(b, edges)
        return x, y, (x.n > 0) & (y.n > 0)

    def gaps(self, a: Series, b: Series, kind: str = "train") -> pd.DataFrame:
        """Per bin both arms have rows in: means, rows, gap a - b and its SE."""
        x, y, both = self.common(a, b, kind)
        return pd.DataFrame(
            {
                "bin": np.flatnonzero(both),
                "bin_start": x.edges[:-1][both],
                "bin_end": x.edges[1:][both],
                "mean_a": x.mean[both],
                "mean_b": y.mean[both],
                "n_a": x.n[both].astype(np.int64),
                "n_b": y.n[both].astype(np.int64),
                "gap": (x.mean - y.mean)[both],
                "gap_se": np.sqrt(x.se**2 + y.se**2)[both],
            }
        )


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


ARM_COLUMNS = ["arm", "batch_size", "state", "tokens", "loss_std", "b_simple", "tokens_per_s", "gpu_hours"]


def arm_context(arms: dict[str, Arm]) -> pd.DataFrame:
    """Per arm over the window: batch, state, tokens reached, per-step loss noise, B_simple, speed, cost."""
    rows = [
        [a.name, a.batch, a.state, a.tokens, a.loss_std, a.b_simple, a.tokens_per_s, a.gpu_hours]
        for a in arms.values()
    ]
    return pd.DataFrame(rows, columns=ARM_COLUMNS)


def op_spreads(arms: dict[str, Arm], pairs: list[list[str]], grids: PairGrid) -> dict[str, float]:
    """Per arm: mean |mean gap| (training loss) to arms of other pairs at the same batch size; for an
    arm with none, to the arms in no pair at its batch size (a study's reference arms, e.g. the
    constant-lr arm next to a step-decay / Seesaw pair)."""
    pair_of = {arm: i for i, pair in enumerate(pairs) for arm in pair if arm in arms}
    found: dict[str, list[float]] = {}

    def gap(x: str, y: str) -> float | None:
        bx, by, both = grids.common(arms[x].train, arms[y].train)
        return abs(float(np.mean((bx.mean - by.mean)[both]))) if both.any() else None

    for x, y in combinations(sorted(pair_of), 2):
        if arms[x].batch == arms[y].batch and pair_of[x] != pair_of[y] and (g := gap(x, y)) is not None:
            found.setdefault(x, []).append(g)
            found.setdefault(y, []).append(g)
    references = [arm for arm in sorted(arms) if arm not in pair_of]
    for x in sorted(set(pair_of) - set(found)):
        for ref in references:
            if arms[ref].batch == arms[x].batch and (g := gap(x, ref)) is not None:
                found.setdefault(x, []).append(g)
    return {arm: float(np.mean(v)) for arm, v in found.items()}


def pair_table(
    arms: dict[str, Arm],
    pairs: list[list[str]],
    grids: PairGrid,
    spread: dict[str, float],
    margin: Margin,
    kind: str = "train",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per pair, the per-bin gaps of every pair) on `kind` loss; `spread` is
    `op_spreads` (always on training loss), `grids` the binning shared with it."""
    rows, gaps = [], []
    for a, b in pairs:
        if a not in arms or b not in arms or not len(arms[a].series(kind).tokens):
            continue
        bins = grids.gaps(arms[a].series(kind), arms[b].series(kind), kind)
        s = [spread[x] for x in (a, b) if x in spread]
        op_spread = float(np.mean(s)) if s else float("nan")
        delta = margin.nats or margin.fraction * op_spread
        stats_ = summarize_gap(bins["gap"].to_numpy(), delta, margin.alpha)
        small, large = sorted((arms[a], arms[b]), key=lambda x: x.batch)
        std_small, std_large = small.loss_std, large.loss_std
        rows.append(
            {
                "metric": kind,
                "pair": f"{a}-{b}",
                "a": a,
                "b": b,
                "batch_a": arms[a].batch,
                "batch_b": arms[b].batch,
                "from_tokens": float(bins["bin_start"].min()) if len(bins) else float("nan"),
                "to_tokens": float(bins["bin_end"].max()) if len(bins) else float("nan"),
                **stats_,
                "op_spread": op_spread,
                "gap_over_spread": abs(stats_["mean_gap"]) / op_spread if op_spread > 0 else float("nan"),
                "noise_ratio": std_small / std_large if std_large > 0 else float("nan"),
                "sqrt_batch_ratio": math.sqrt(large.batch / small.batch),
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
