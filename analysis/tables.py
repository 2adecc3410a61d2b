"""Pairwise divergence on a common token grid.

Both arms of a pair are cut into the same token bins (by each logged row's `tokens`, the tokens
consumed when the row was logged). Per bin: each arm's mean loss and its standard error (within-
bin std / sqrt(rows)); the gap a - b and its SE. Over bins: the mean gap, its SE (std of the
per-bin gaps / sqrt(bins)), t, the share of bins whose gap has the sign of the mean, max |gap|.

The yardstick is the spread between operating points: arms of different pairs run at the same
batch size (A vs J, H vs B in the seed study). A rule maps one batch size onto another when the
pair's gap is small against that spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd


@dataclass
class BinSpec:
    bins: int = 20  # number of bins over the common token range (when bin_tokens is 0)
    bin_tokens: int = 0  # fixed bin width in tokens; 0 = range / bins
    skip_tokens: int = 0  # leave out rows at or below this many tokens (e.g. the branch transient)


def bin_arms(runs: pd.DataFrame, arms: list[str], spec: BinSpec, kind: str = "train") -> pd.DataFrame:
    """Per arm per bin: mean loss, its SE and row count, on bins common to all `arms`."""
    rows = runs[(runs["kind"] == kind) & runs["arm"].isin(arms) & (runs["tokens"] > spec.skip_tokens)]
    if rows.empty or set(rows["arm"]) != set(arms):
        return pd.DataFrame(columns=["arm", "bin", "bin_start", "bin_end", "mean", "se", "n"])
    end = rows.groupby("arm")["tokens"].max().min()  # only the tokens every arm has reached
    width = spec.bin_tokens or (end - spec.skip_tokens) / spec.bins
    edges = np.arange(spec.skip_tokens, end + width * 0.5, width)
    edges[-1] = max(edges[-1], end)
    rows = rows[rows["tokens"] <= end].assign(
        bin=np.clip(np.searchsorted(edges, rows["tokens"], side="left") - 1, 0, len(edges) - 2)
    )
    out = rows.groupby(["arm", "bin"])["loss"].agg(mean="mean", std="std", n="count").reset_index()
    out["se"] = out["std"].fillna(0.0) / np.sqrt(out["n"])
    out["bin_start"] = edges[out["bin"]]
    out["bin_end"] = edges[out["bin"] + 1]
    return out.drop(columns="std")


def pair_gap(binned: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per common bin: mean of a, mean of b, gap a - b and its SE."""
    left = binned[binned["arm"] == a].set_index("bin")
    right = binned[binned["arm"] == b].set_index("bin")
    common = left.index.intersection(right.index)
    gap = pd.DataFrame({"bin_start": left.loc[common, "bin_start"], "bin_end": left.loc[common, "bin_end"]})
    gap[f"mean_{a}"] = left.loc[common, "mean"]
    gap[f"mean_{b}"] = right.loc[common, "mean"]
    gap["gap"] = left.loc[common, "mean"] - right.loc[common, "mean"]
    gap["gap_se"] = np.sqrt(left.loc[common, "se"] ** 2 + right.loc[common, "se"] ** 2)
    return gap.reset_index()


def summarize_gap(gap: pd.DataFrame) -> dict[str, float]:
    n = len(gap)
    mean = float(gap["gap"].mean()) if n else float("nan")
    se = float(gap["gap"].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    same_sign = float((np.sign(gap["gap"]) == np.sign(mean)).mean()) if n else float("nan")
    return {
        "bins": n,
        "mean_gap": mean,
        "gap_se": se,
        "t": mean / se if se and np.isfinite(se) and se > 0 else float("nan"),
        "same_sign": same_sign,
        "max_abs_gap": float(gap["gap"].abs().max()) if n else float("nan"),
    }


def pair_table(
    runs: pd.DataFrame, pairs: list[list[str]], spec: BinSpec, kind: str = "train"
) -> pd.DataFrame:
    """One row per declared pair: gap statistics and the operating-point spread it is judged against."""
    batch = runs.groupby("arm")["batch_size"].first().to_dict()
    pair_of = {arm: i for i, pair in enumerate(pairs) for arm in pair}
    # Spread between operating points: |mean gap| of arms from different pairs at the same batch size.
    spreads: dict[str, list[float]] = {}
    for x, y in combinations(sorted(pair_of), 2):
        if x in batch and y in batch and batch[x] == batch[y] and pair_of[x] != pair_of[y]:
            s = abs(summarize_gap(pair_gap(bin_arms(runs, [x, y], spec, kind), x, y))["mean_gap"])
            for arm in (x, y):
                spreads.setdefault(arm, []).append(s)
    out = []
    for a, b in pairs:
        stats = summarize_gap(pair_gap(bin_arms(runs, [a, b], spec, kind), a, b))
        spread = [s for arm in (a, b) for s in spreads.get(arm, []) if np.isfinite(s)]
        op_spread = float(np.mean(spread)) if spread else float("nan")
        ratio = abs(stats["mean_gap"]) / op_spread if op_spread > 0 else float("nan")
        out.append(
            {
                "pair": f"{a}-{b}",
                "a": a,
                "b": b,
                "batch_a": batch.get(a),
                "batch_b": batch.get(b),
                **stats,
                "op_spread": op_spread,
                "gap_over_spread": ratio,
            }
        )
    return pd.DataFrame(out)
