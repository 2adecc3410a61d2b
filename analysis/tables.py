"""Pairwise comparison of arms: paired gaps on matched samples, robust intervals, verdicts.

For a pair (a, b), on training loss:

- the matched windows after `skip_tokens` (analysis/paired.py): per window the paired gap a - b
  over exactly the samples both arms consumed there;
- the compared range cut into `segments` (4) equal token ranges; per segment the mean gap with its
  autocorrelation-robust standard error (analysis/robust.py) and t interval;
- the verdict, an intersection-union test over the segments: **equivalent** when every segment's
  (1 - 2 alpha) interval lies inside +-delta (the curves match throughout, not only on average: a
  gap of +2 delta early and -2 delta late is not equivalent); **NOT equivalent** when some
  segment's (1 - alpha/K) interval lies entirely outside +-delta (Bonferroni over the K segments,
  so curves that truly match get this verdict at most alpha of the time); **inconclusive**
  otherwise. The summary columns are the mean gap over the whole range with its robust interval
  and `reach`, the largest |bound| of the segments' intervals (equivalent iff reach < delta);
- display bins (`bins` or `bin_tokens`, for tables and plots only: the verdict never depends on
  them), with edges on window boundaries and per-bin standard errors from the pair's long-run
  variance;
- with several data-order replicates (arms that differ only in trainer.data_seed / init_seed),
  each replicate is paired with itself, and every estimate is the mean over replicates with the
  larger of the between-replicate SE (t on replicates - 1 df) and the within-replicate one.

On validation loss, every arm is evaluated on the same fixed sequences: at each common evaluation
after `skip_tokens`, the per-sequence loss differences give the exact paired standard error (t on
sequences - 1 df), and the same intersection-union verdict runs over the evaluations.

delta is `Margin.nats`, or `Margin.fraction` of the yardstick: the mean |mean gap| of the
operating-point pairs the experiment declares (`experiment.yardstick`: two arms at the same batch
size with different operating points, A vs J and H vs B in the seed study). It is one number per
sweep variant, the same for every pair: controls, extra pairs and the arms under test never enter
it unless declared, so no arm that is far off can make "equivalent" easier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.collect import ArmRows
from analysis.paired import (
    Steps,
    Windows,
    assign,
    bin_edges,
    in_range,
    matched_windows,
    mean_gap,
    residual_lrv,
    segment_estimates,
    successive_noise,
)
from analysis.robust import Estimate, robust_mean


@dataclass
class BinSpec:
    bins: int = 20  # display bins over the compared token range (when bin_tokens is 0)
    bin_tokens: int = 0  # fixed display bin width in tokens; 0 = range / bins
    skip_tokens: int = 0  # leave out samples before this many tokens (e.g. the branch transient)
    until_tokens: int = 0  # leave out samples past this many tokens; 0 = up to the common end
    segments: int = 4  # the verdict's token ranges: every one must match


@dataclass
class Margin:
    nats: float = 0.0  # equivalence margin delta in nats; 0 = `fraction` x the operating-point spread
    fraction: float = 0.25
    alpha: float = 0.05  # equivalent when every segment's (1 - 2 alpha) interval lies inside +-delta


def option_problems(spec: BinSpec, margin: Margin) -> list[str]:
    """Analysis options outside their range, each naming its key (checked before anything is read)."""
    checks = [
        ("analysis.bins", spec.bins, spec.bins >= 1, "at least 1"),
        ("analysis.bin_tokens", spec.bin_tokens, spec.bin_tokens >= 0, "0 (use bins) or more tokens"),
        ("analysis.skip_tokens", spec.skip_tokens, spec.skip_tokens >= 0, "0 or more tokens"),
        ("analysis.until_tokens", spec.until_tokens, spec.until_tokens >= 0, "0 (to the end) or more tokens"),
        ("analysis.segments", spec.segments, spec.segments >= 1, "at least 1"),
        ("analysis.margin", margin.nats, margin.nats >= 0, "0 (a fraction of the spread) or more nats"),
        ("analysis.margin_fraction", margin.fraction, margin.fraction > 0, "a positive fraction"),
        (
            "analysis.alpha",
            margin.alpha,
            0 < margin.alpha < 0.5,
            "a level in (0, 0.5): 0.05 gives 90% intervals",
        ),
    ]
    problems = [f"{key}={value}: expected {what}" for key, value, ok, what in checks if not ok]
    if spec.until_tokens and spec.until_tokens <= spec.skip_tokens:
        problems.append(f"analysis.until_tokens={spec.until_tokens} is not past analysis.skip_tokens")
    return problems


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
    steps: Steps
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
            steps=Steps.of(df["step"].to_numpy(np.int64)[train], tokens[train], loss[train]),
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
        )
    return out


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


def verdict(estimates: list[Estimate], delta: float, alpha: float) -> str:
    """The intersection-union verdict over segments (or evaluations) of one pair; see the module doc."""
    if estimates and all(e.n == 0 for e in estimates):
        return "no verdict: no per-sequence losses"
    if not estimates or not all(math.isfinite(e.se) for e in estimates):
        return "no verdict: too few samples"
    if not (math.isfinite(delta) and delta > 0):
        return "no verdict: no margin"
    k = len(estimates)
    outside = [e.ci(1 - alpha / k) for e in estimates]
    if any(lo > delta or hi < -delta for lo, hi in outside):
        return "not equivalent"
    if all(-delta < lo and hi < delta for lo, hi in (e.ci(1 - 2 * alpha) for e in estimates)):
        return "equivalent"
    return "inconclusive"


def reach(estimates: list[Estimate], alpha: float) -> float:
    """The largest |bound| of the estimates' (1 - 2 alpha) intervals: equivalent iff it is < delta."""
    bounds = [abs(b) for e in estimates for b in e.ci(1 - 2 * alpha)]
    return max(bounds) if bounds and all(map(math.isfinite, bounds)) else math.nan


def _replicate_pairs(arms: dict[str, Arm], a: str, b: str, variant: str = "") -> list[tuple[Arm, Arm]]:
    """(run of a, run of b) per data-order replicate both have, in the sweep `variant` (the other
    overrides the sweep varies, e.g. experiment.ratio=16); `a`, `b` name arms or runs."""

    def runs(name: str) -> dict[str, Arm]:
        if name in arms and arms[name].base != name:  # a run named directly
            return {arms[name].replicate: arms[name]}
        return {arm.replicate: arm for arm in arms.values() if arm.base == name and arm.variant == variant}

    ra, rb = runs(a), runs(b)
    return [(ra[r], rb[r]) for r in sorted(set(ra) & set(rb))]


@dataclass
class PairFit:
    """A pair on training loss, pooled over its replicates."""

    windows: list[Windows]  # per replicate, in the compared range
    segment_edges: np.ndarray
    segments: list[Estimate]
    summary: Estimate
    bins: pd.DataFrame  # the display bins


def fit_pair(runs: list[tuple[Arm, Arm]], spec: BinSpec) -> PairFit:
    """Matched windows, segment and summary estimates and display bins of a pair's replicates."""
    windows = [
        in_range(matched_windows(x.steps, y.steps), spec.skip_tokens, spec.until_tokens) for x, y in runs
    ]
    windows = [w for w in windows if len(w)]
    if not windows:
        return PairFit([], np.empty(0), [], Estimate(math.nan, math.nan, 0.0, 0), pd.DataFrame())
    edges, _ = segment_estimates(windows[0], spec.segments)
    per_replicate = [_segments_on(w, edges) for w in windows]
    segments = [combine([seg[i] for seg in per_replicate]) for i in range(len(edges) - 1)]
    summary = combine([robust_mean(w.gap, w.length) for w in windows])
    return PairFit(windows, edges, segments, summary, _display_bins(windows, edges, spec))


def _segments_on(w: Windows, edges: np.ndarray) -> list[Estimate]:
    which = assign(w, edges)
    return [robust_mean(w.gap[which == i], w.length[which == i]) for i in range(len(edges) - 1)]


def _display_bins(windows: list[Windows], segment_edges: np.ndarray, spec: BinSpec) -> pd.DataFrame:
    """Per display bin: both arms' mean loss and the gap with its SE, pooled over replicates."""
    edges = bin_edges(windows[0], spec.bins, spec.bin_tokens)
    per_bin: list[list[tuple[float, float, Estimate]]] = [[] for _ in range(len(edges) - 1)]
    for w in windows:
        omega, nu = residual_lrv(w, assign(w, segment_edges))
        which = assign(w, edges)
        for i in range(len(edges) - 1):
            sel = which == i
            if sel.any():
                weight = w.length[sel] / w.length[sel].sum()
                n = int(sel.sum())
                gap = Estimate(
                    float(w.gap[sel] @ weight), math.sqrt(omega / n) if nu else math.nan, float(nu), n
                )
                per_bin[i].append((float(w.a[sel] @ weight), float(w.b[sel] @ weight), gap))
    rows = []
    for i, found in enumerate(per_bin):
        if found:
            gap = combine([g for *_, g in found])
            rows.append(
                {
                    "bin": i,
                    "bin_start": int(edges[i]),
                    "bin_end": int(edges[i + 1]),
                    "windows": gap.n,
                    "mean_a": float(np.mean([a for a, _, _ in found])),
                    "mean_b": float(np.mean([b for _, b, _ in found])),
                    "gap": gap.mean,
                    "gap_se": gap.se,
                    "gap_df": gap.df,
                }
            )
    return pd.DataFrame(rows)


def validation_estimates(runs: list[tuple[Arm, Arm]], skip_tokens: int) -> tuple[np.ndarray, list[Estimate]]:
    """Per common evaluation after `skip_tokens`: the paired gap over the validation sequences with
    its exact SE, pooled over replicates. Without per-sequence losses (runs logged before they were
    recorded, or the W&B source) the gap has no SE."""
    common: set[int] | None = None
    for x, y in runs:
        both = set(x.val_tokens.tolist()) & set(y.val_tokens.tolist())
        common = both if common is None else common & both
    points = np.array(sorted(t for t in (common or set()) if t > skip_tokens), dtype=np.int64)
    out = []
    for t in points:
        per_replicate = []
        for x, y in runs:
            sx, sy = x.val_sequences.get(int(t)), y.val_sequences.get(int(t))
            if sx is not None and sy is not None and len(sx) == len(sy) and len(sx) > 1:
                d = sx - sy
                per_replicate.append(
                    Estimate(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1.0, len(d))
                )
            else:
                gap = float(x.val_loss[x.val_tokens == t][0] - y.val_loss[y.val_tokens == t][0])
                per_replicate.append(Estimate(gap, math.nan, 0.0, 0))
        out.append(combine(per_replicate))
    return points, out


@dataclass
class Spread:
    """The yardstick of one sweep variant: the |mean gap| of each declared operating-point pair
    (two arms at the same batch size, different operating points) and their mean."""

    gaps: dict[str, float]  # yardstick pair -> |mean gap| (training loss, matched windows, compared range)
    missing: list[str]  # yardstick pairs that could not be measured, each with why

    @property
    def value(self) -> float:
        return float(np.mean(list(self.gaps.values()))) if self.gaps else math.nan


def yardstick_spreads(arms: dict[str, Arm], yardstick: list[list[str]], spec: BinSpec) -> dict[str, Spread]:
    """Per sweep variant: the spread between operating points that the experiment declares as its
    yardstick (e.g. A vs J and H vs B in the seed study). Only the declared pairs enter it: a
    control, an extra pair or an arm under test that is far off can never widen the margin."""
    out = {}
    for variant in sorted({arm.variant for arm in arms.values()}):
        gaps, missing = {}, []
        for x, y in yardstick:
            runs = _replicate_pairs(arms, x, y, variant)
            # A diverged or failed arm's loss is no operating point: it would set the margin by its blow-up.
            bad = sorted({f"{r.base} {r.state}" for a, b in runs for r in (a, b) if r.state in UNUSABLE})
            bad += [apart] if (apart := _branch_apart(runs)) else []
            gap = [mean_gap(a.steps, b.steps, spec.skip_tokens, spec.until_tokens) for a, b in runs]
            gap = [g for g in gap if math.isfinite(g)]
            if not runs:
                missing.append(
                    _why_not_compared(arms, x, y, f"{x}-{y}", variant).replace(": not compared", "")
                )
            elif bad or not gap:
                why = ", ".join(bad) if bad else "no rows of both arms in the compared range"
                missing.append(f"{x}-{y} ({why})")
            else:
                gaps[f"{x}-{y}"] = abs(float(np.mean(gap)))
        out[variant] = Spread(gaps, missing)
    return out


UNUSABLE = ("diverged", "failed")


def _branch_apart(runs: list[tuple[Arm, Arm]]) -> str:
    """Why a pair's runs cannot be compared because they started from different weights (one arm
    rerun with a config that redid the warmup), or "" when they share their start."""
    for x, y in runs:
        if x.branch and y.branch and x.branch != y.branch:
            return f"{x.name} started from {x.branch} but {y.name} from {y.branch}"
    return ""


def _pair_name(pair: list[str], variant: str) -> str:
    return "-".join(pair) + (f"[{variant}]" if variant else "")


def pair_rows(
    arms: dict[str, Arm],
    pairs: list[list[str]],
    spec: BinSpec,
    margin: Margin,
    spreads: dict[str, Spread],
    controls: list[list[str]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(one row per pair and metric, the display bins and evaluations of every pair, the pairs not
    compared with why). δ is `margin.nats`, or `margin.fraction` of the variant's yardstick spread
    (`yardstick_spreads`). `controls` are compared like any pair and marked `role` = control."""
    control = {tuple(p) for p in controls or []}
    rows, details, skipped = [], [], []
    variants = sorted({arm.variant for arm in arms.values()})
    for (a, b), variant in ((p, v) for p in pairs for v in variants):
        name = _pair_name([a, b], variant)
        runs = _replicate_pairs(arms, a, b, variant)
        if not runs:
            skipped.append(_why_not_compared(arms, a, b, name, variant))
            continue
        apart = _branch_apart(runs)
        if apart:
            skipped.append(f"{name}: not compared: {apart}: rerun both with one config")
            continue
        spread = spreads.get(variant, Spread({}, []))
        delta = margin.nats or margin.fraction * spread.value
        common = {
            "pair": name,
            "role": "control" if (a, b) in control else "pair",
            "a": a,
            "b": b,
            "batch_a": runs[0][0].batch,
            "batch_b": runs[0][1].batch,
            "replicates": len(runs),
            "delta": delta,
            "op_spread": spread.value,
            **_regime_columns(runs),
        }
        fit = fit_pair(runs, spec)
        if fit.windows:
            rows.append({"metric": "train", **common, **_train_columns(fit, runs, margin, delta)})
            details.append(fit.bins.assign(unit="bin", metric="train", pair=name, delta=delta))
            details.append(
                _estimates_frame(fit.segment_edges[:-1], fit.segment_edges[1:], fit.segments).assign(
                    unit="segment", metric="train", pair=name, delta=delta
                )
            )
        points, evals = validation_estimates(runs, spec.skip_tokens)
        if len(points):
            rows.append({"metric": "val", **common, **_val_columns(points, evals, margin, delta)})
            details.append(
                _estimates_frame(points, points, evals).assign(
                    unit="evaluation", metric="val", pair=name, delta=delta
                )
            )
    table = pd.DataFrame(rows)
    if len(table):
        table["gap_over_spread"] = table["mean_gap"].abs() / table["op_spread"]
    frames = pd.concat(details, ignore_index=True) if details else pd.DataFrame()
    return table, frames, list(dict.fromkeys(skipped))


def _why_not_compared(arms: dict[str, Arm], a: str, b: str, name: str, variant: str) -> str:
    """Why a pair has no run of both arms to compare (said in the report, never silently dropped)."""
    absent = [x for x in (a, b) if not any(x in (arm.base, arm.name) for arm in arms.values())]
    if absent:
        return f"{a}-{b}: not compared: arm {' and '.join(absent)} logged no rows yet"
    here = [x for x in (a, b) if not any(arm.base == x and arm.variant == variant for arm in arms.values())]
    if here:
        return f"{name}: not compared: {' and '.join(here)} did not run in this sweep variant"
    return f"{name}: not compared: {a} and {b} share no data-order replicate"


def _regime_columns(runs: list[tuple[Arm, Arm]]) -> dict[str, Any]:
    """B / B_noise of each arm of a pair (mean over replicates) and its regime."""
    out: dict[str, Any] = {}
    for side, arms in (("a", [a for a, _ in runs]), ("b", [b for _, b in runs])):
        b_noise = float(np.mean([arm.b_noise for arm in arms]))
        out[f"b_over_noise_{side}"] = arms[0].batch / b_noise
        out[f"regime_{side}"] = regime(arms[0].batch, b_noise)
    return out


def _estimates_frame(starts: np.ndarray, ends: np.ndarray, estimates: list[Estimate]) -> pd.DataFrame:
    """Token ranges with their gap estimates, in the display bins' columns."""
    return pd.DataFrame(
        {
            "bin": np.arange(len(estimates)),
            "bin_start": np.asarray(starts, dtype=np.int64),
            "bin_end": np.asarray(ends, dtype=np.int64),
            "windows": [e.n for e in estimates],
            "gap": [e.mean for e in estimates],
            "gap_se": [e.se for e in estimates],
            "gap_df": [e.df for e in estimates],
        }
    )


def _summary_columns(
    summary: Estimate, parts: list[Estimate], margin: Margin, delta: float
) -> dict[str, Any]:
    lo, hi = summary.ci(1 - 2 * margin.alpha)
    signs = [np.sign(e.mean) for e in parts if math.isfinite(e.mean)]
    return {
        "mean_gap": summary.mean,
        "gap_se": summary.se,
        "ci_low": lo,
        "ci_high": hi,
        "reach": reach(parts, margin.alpha),
        "same_sign": float(np.mean(np.array(signs) == np.sign(summary.mean))) if signs else math.nan,
        "alpha": margin.alpha,
        "verdict": verdict(parts, delta, margin.alpha),
    }


def _train_columns(fit: PairFit, runs: list[tuple[Arm, Arm]], margin: Margin, delta: float) -> dict[str, Any]:
    w = fit.windows[0]
    paired = successive_noise(w.gap)
    unpaired = math.sqrt(successive_noise(w.a) ** 2 + successive_noise(w.b) ** 2)
    return {
        "from_tokens": int(w.start[0]),
        "to_tokens": int(w.end[-1]),
        "windows": len(w),
        "segments": len(fit.segments),
        **_summary_columns(fit.summary, fit.segments, margin, delta),
        "paired_noise": paired,
        "unpaired_noise": unpaired,
        "pairing_gain": unpaired / paired if paired > 0 else math.nan,
    }


def _val_columns(points: np.ndarray, evals: list[Estimate], margin: Margin, delta: float) -> dict[str, Any]:
    # The summary on validation is the gap at the last common evaluation: the end of the comparison.
    return {
        "from_tokens": int(points[0]),
        "to_tokens": int(points[-1]),
        "windows": len(points),
        "segments": len(points),
        **_summary_columns(evals[-1], evals, margin, delta),
    }


def ranking(arms: dict[str, Arm], pairs: pd.DataFrame) -> pd.DataFrame:
    """Arm runs by final validation loss, lowest first, each with its paired validation gap to the
    arm it is compared with (this arm minus that one, at their last common evaluation: negative =
    lower loss), that gap's interval and verdict. An arm compared with several gets one row each.
    A run that did not complete (diverged, still running) is ranked by its last evaluation and
    says so in `state`."""
    rows = []
    val = pairs[pairs["metric"] == "val"] if len(pairs) else pairs
    for a in arms.values():
        if not len(a.val_loss):
            continue
        final = float(a.val_loss[np.argmax(a.val_tokens)])
        base = {
            "arm": a.name,
            "batch_size": a.batch,
            "final_val_loss": final,
            "regime": regime(a.batch, a.b_noise),
            "state": a.state,
        }
        suffix = f"[{a.variant}]" if a.variant else ""
        mine = [r for r in val.to_dict("records") if r["b"] == a.base and r["pair"].endswith(suffix)]
        if not mine:
            rows.append(base)
        for r in mine:  # the pair's gap is a - b; this arm is b
            lo, hi = -r["ci_high"], -r["ci_low"]
            rows.append(
                {
                    **base,
                    "vs": r["a"],
                    "gap": -r["mean_gap"],
                    "ci_low": lo,
                    "ci_high": hi,
                    "verdict": r["verdict"],
                }
            )
    columns = ["arm", "batch_size", "final_val_loss", "vs", "gap", "ci_low", "ci_high", "verdict", "regime"]
    columns += ["state"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("final_val_loss", kind="stable").reset_index(drop=True)


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
        }
        for a in arms.values()
    ]
    return pd.DataFrame(rows, columns=ARM_COLUMNS)


ARM_COLUMNS = [
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
]
ARM_COLUMNS += ["gpu_hours"]


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
    if verdict_ == "equivalent":
        head = (
            f"equivalent within ±{delta:.3g} nats: every {unit[:-1]}'s {level} CI lies inside "
            f"(reach {row['reach']:.3g})"
        )
    elif verdict_ == "not equivalent":
        head = f"NOT equivalent: in some {unit[:-1]} {a} is off {b} by more than ±{delta:.3g} nats"
    elif verdict_ == "inconclusive":
        head = (
            f"inconclusive: a {unit[:-1]}'s {level} CI reaches {row['reach']:.3g} past ±{delta:.3g} nats "
            "(more tokens or data-order replicates would decide)"
        )
    elif verdict_ == "no verdict: no margin":
        head = "no verdict: no margin (no yardstick pair measured: see above; or set analysis.margin)"
    else:
        head = verdict_
    return f"{row['pair']} ({row['metric']}): {head}; {facts}."
