"""The verdict on a pair: do two arms' curves match within a margin?

An intersection-union test over the pair's token segments (or validation evaluations): the method
is docs/verdict.md; the functions here are its only implementation.

- **equivalent**: every segment's (1 - 2 alpha) interval lies inside +-delta (the curves match
  throughout, not only on average: +2 delta early and -2 delta late is not equivalent);
- **NOT equivalent**: some segment's (1 - alpha/K) interval lies entirely outside +-delta
  (Bonferroni over the K segments, so curves that truly match get it at most alpha of the time);
- **inconclusive** otherwise; and three ways to have no verdict, each named.

`reach`, the largest |bound| of the segments' (1 - 2 alpha) intervals, says how close it came
(equivalent iff reach < delta). With several data-order replicates each estimate is combined
over them (`combine`).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import numpy as np

from analysis.robust import Estimate


class Verdict(StrEnum):
    """A pair's verdict; the values are what the tables and pairs.md show."""

    EQUIVALENT = "equivalent"
    NOT_EQUIVALENT = "not equivalent"
    INCONCLUSIVE = "inconclusive"
    NO_MARGIN = "no verdict: no margin"
    TOO_FEW = "no verdict: too few samples"
    NO_SEQUENCES = "no verdict: no per-sequence losses"


def combine(estimates: list[Estimate]) -> Estimate:
    """The mean over data-order replicates of one quantity, each estimated from its own run.

    Its SE is the larger of the between-replicate SE (the spread of the replicate means: every
    source of difference between data orders, on replicates - 1 df) and the within-replicate SE
    (each run's own robust SE, combined), so that two lucky replicates cannot make a verdict
    stronger than one run's own noise allows."""
    estimates = [e for e in estimates if math.isfinite(e.mean)]
    if len(estimates) <= 1:
        return estimates[0] if estimates else Estimate(math.nan, math.nan, 0.0, 0)
    s = len(estimates)
    means = np.array([e.mean for e in estimates])
    within_var = np.array([e.se**2 for e in estimates])
    within = math.sqrt(float(np.sum(within_var))) / s
    between = float(np.std(means, ddof=1)) / math.sqrt(s)
    n = sum(e.n for e in estimates)
    if between >= within or not math.isfinite(within):
        return Estimate(float(means.mean()), between, float(s - 1), n)
    # Welch-Satterthwaite degrees of freedom of the summed within-replicate variances.
    df = float(
        np.sum(within_var) ** 2 / np.sum(within_var**2 / np.array([max(e.df, 1.0) for e in estimates]))
    )
    return Estimate(float(means.mean()), within, df, n)


def verdict(
    estimates: list[Estimate], delta: float, alpha: float, levels: list[tuple[float, float]] | None = None
) -> Verdict:
    """The intersection-union verdict over segments (or evaluations) of one pair; see the module doc.
    `levels`: per estimate, the one-sided levels of its equivalence and NOT-equivalence tests (a
    look of the sequential verdict, analysis/sequential.py); None: the fixed-budget ones, alpha
    and alpha / 2K."""
    if estimates and all(e.n == 0 for e in estimates):
        return Verdict.NO_SEQUENCES
    if not estimates or not all(math.isfinite(e.se) for e in estimates):
        return Verdict.TOO_FEW
    if not (math.isfinite(delta) and delta > 0):
        return Verdict.NO_MARGIN
    k = len(estimates)
    levels = levels or [(alpha, alpha / (2 * k))] * k  # one side of one estimate's test
    outside = [e.ci(1 - 2 * differ) for e, (_, differ) in zip(estimates, levels, strict=True)]
    if any(lo > delta or hi < -delta for lo, hi in outside):
        return Verdict.NOT_EQUIVALENT
    inside = [e.ci(1 - 2 * match) for e, (match, _) in zip(estimates, levels, strict=True)]
    if all(-delta < lo and hi < delta for lo, hi in inside):
        return Verdict.EQUIVALENT
    return Verdict.INCONCLUSIVE


def reach(estimates: list[Estimate], alpha: float) -> float:
    """The largest |bound| of the estimates' (1 - 2 alpha) intervals: equivalent iff it is < delta."""
    bounds = [abs(b) for e in estimates for b in e.ci(1 - 2 * alpha)]
    return max(bounds) if bounds and all(map(math.isfinite, bounds)) else math.nan


def verdict_line(row: dict[str, Any]) -> str:
    """A pair's verdict in words."""
    a, b, m = row["a"], row["b"], row["mean_gap"]
    side = "above" if m > 0 else "below" if m < 0 else "level with"
    level = f"{1 - 2 * row['alpha']:.0%}"
    unit = "segments" if row["metric"] == "train" else "evaluations"
    ci = (
        f" ({level} CI [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}])" if math.isfinite(row["ci_low"]) else ""
    )
    facts = (
        f"mean gap {m:+.3g} nats{ci}; {a} {side} {b} in {row['same_sign']:.0%} of {row['segments']} {unit}"
    )
    delta, verdict_ = row["delta"], row["verdict"]
    if verdict_ == Verdict.EQUIVALENT:
        head = (
            f"equivalent within ±{delta:.3g} nats: every {unit[:-1]}'s {level} CI lies inside "
            f"(reach {row['reach']:.3g})"
        )
    elif verdict_ == Verdict.NOT_EQUIVALENT:
        head = f"NOT equivalent: in some {unit[:-1]} {a} is off {b} by more than ±{delta:.3g} nats"
    elif verdict_ == Verdict.INCONCLUSIVE:
        article = "an" if unit[0] in "aeiou" else "a"
        head = (
            f"inconclusive: {article} {unit[:-1]}'s {level} CI reaches {row['reach']:.3g} past "
            f"±{delta:.3g} nats (more tokens or data-order replicates would decide)"
        )
    elif verdict_ == Verdict.NO_MARGIN:
        head = "no verdict: no margin (no yardstick pair measured: see above; or set analysis.margin)"
    else:
        head = verdict_
    return f"{row['pair']} ({row['metric']}): {head}; {facts}."
