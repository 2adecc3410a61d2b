"""Pairwise comparison of arms: paired gaps on matched samples, robust intervals, a verdict per pair
and metric, the yardstick that sets the margin, and the ranking.

For a pair (a, b), on training loss:

- the matched windows after `skip_tokens` (analysis/paired.py): per window the paired gap a - b
  over exactly the samples both arms consumed there;
- the compared range cut into `segments` (4) equal token ranges; per segment the mean gap with its
  autocorrelation-robust standard error (analysis/robust.py) and t interval, and the verdict over
  them (analysis/verdict.py); the summary is the mean gap over the whole range;
- display bins (`bins` or `bin_tokens`, for tables and plots only: the verdict never depends on
  them), with edges on window boundaries and per-bin standard errors from the pair's long-run
  variance;
- with several data-order replicates (arms that differ only in trainer.data_seed / init_seed),
  each replicate is paired with itself and every estimate combined over them.

On validation loss, every arm is evaluated on the same fixed sequences: at each common evaluation
after `skip_tokens`, the per-sequence loss differences give the exact paired standard error (t on
sequences - 1 df), and the same verdict runs over the evaluations.

delta is `Margin.nats`, or `Margin.fraction` of the yardstick: the mean |mean gap| of the
operating-point pairs the experiment declares (`experiment.yardstick`: two arms at the same batch
size with different operating points, A vs J and H vs B in the seed study). It is one number per
sweep variant, the same for every pair: controls, extra pairs and the arms under test never enter
it unless declared, so no arm that is far off can make "equivalent" easier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.arms import Arm, regime
from analysis.options import BinSpec, Margin
from analysis.paired import (
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
from analysis.verdict import combine, reach, verdict


def replicate_pairs(arms: dict[str, Arm], a: str, b: str, variant: str = "") -> list[tuple[Arm, Arm]]:
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


def validation_estimates(
    runs: list[tuple[Arm, Arm]], skip_tokens: int, until_tokens: int = 0
) -> tuple[np.ndarray, list[Estimate]]:
    """Per common evaluation after `skip_tokens` and up to `until_tokens` (0: no cap), as for the
    training loss: the paired gap over the validation sequences with its exact SE, pooled over
    replicates. Without per-sequence losses (runs logged before they were recorded, or the W&B
    source) the gap has no SE."""
    common: set[int] | None = None
    for x, y in runs:
        both = set(x.val_tokens.tolist()) & set(y.val_tokens.tolist())
        common = both if common is None else common & both
    kept = (t for t in (common or set()) if t > skip_tokens and (not until_tokens or t <= until_tokens))
    points = np.array(sorted(kept), dtype=np.int64)
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
            runs = replicate_pairs(arms, x, y, variant)
            # A diverged or failed arm's loss is no operating point: it would set the margin by its blow-up.
            bad = sorted({f"{r.base} {r.state}" for a, b in runs for r in (a, b) if r.state in UNUSABLE})
            bad += [apart] if (apart := _branch_apart(runs)) else []
            gap = [mean_gap(a.steps, b.steps, spec.skip_tokens, spec.until_tokens) for a, b in runs]
            gap = [g for g in gap if math.isfinite(g)]
            if not runs:
                missing.append(f"{x}-{y}: {_no_runs(arms, x, y, variant)[0]}")
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


def pair_name(pair: list[str] | tuple[str, str], variant: str = "") -> str:
    """A pair as the tables name it: `A-H`, or `A-H[experiment.ratio=16]` in a sweep variant."""
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
        name = pair_name([a, b], variant)
        runs = replicate_pairs(arms, a, b, variant)
        if not runs:
            why, everywhere = _no_runs(arms, a, b, variant)
            skipped.append(f"{f'{a}-{b}' if everywhere else name}: not compared: {why}")
            continue
        apart = _branch_apart(runs)
        if apart:
            skipped.append(f"{name}: not compared: {apart}: rerun both with one config")
            continue
        spread = spreads.get(variant, Spread({}, []))
        delta = margin.delta(spread.value)
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
        points, evals = validation_estimates(runs, spec.skip_tokens, spec.until_tokens)
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


def _no_runs(arms: dict[str, Arm], a: str, b: str, variant: str) -> tuple[str, bool]:
    """Why a pair has no run of both arms in `variant` (said in the report, never silently
    dropped), and whether that holds in every variant."""
    absent = [x for x in (a, b) if not any(x in (arm.base, arm.name) for arm in arms.values())]
    if absent:
        return f"arm {' and '.join(absent)} logged no rows yet", True
    here = [x for x in (a, b) if not any(arm.base == x and arm.variant == variant for arm in arms.values())]
    if here:
        return f"{' and '.join(here)} did not run in this sweep variant", False
    return f"{a} and {b} share no data-order replicate", False


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
        # Identical arms (no paired noise at all): pairing removed all of the noise.
        "pairing_gain": unpaired / paired if paired > 0 else math.inf if unpaired > 0 else math.nan,
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
