"""The three figures of a comparison, sized and labelled for a paper (units on every axis).

- curves.png: loss vs tokens (millions) for every arm; the two arms of a pair share a colour, the
  smaller batch dashed.
- equivalence.png: per pair, the paired gap per display bin with its robust interval, the verdict
  segments' intervals as boxes, the +-delta band, the skipped range shaded, the verdict written.
- pairing.png: per pair, the per-window noise of the paired gap against the unpaired one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis.verdict import Verdict

FIGURES = ("curves.png", "equivalence.png", "pairing.png", "regime.png", "cbs.png", "cbs_fit.png")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(context: pd.DataFrame, pairs: list[list[str]]) -> dict[str, Any]:
    """Per arm run: one colour per pair (both its arms, every replicate), then one per other arm."""
    palette = _pyplot().get_cmap("tab10").colors
    base = dict(zip(context["arm"], context["base"], strict=True))
    groups = [set(p) for p in pairs] + [{b} for b in dict.fromkeys(base.values())]
    colour_of_base: dict[str, Any] = {}
    for group in groups:
        if group & set(colour_of_base) or not group & set(base.values()):
            continue
        n = len(set(colour_of_base.values()))
        colour_of_base |= dict.fromkeys(group, palette[n % len(palette)])
    return {arm: colour_of_base[b] for arm, b in base.items()}


def curves(
    binned: pd.DataFrame,
    context: pd.DataFrame,
    pairs: list[list[str]],
    labels: dict[str, str],
    path: Path,
    title: str,
) -> None:
    """Loss vs tokens, every arm run: bin means with +-SE bands; a pair's smaller batch dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    colour = _colours(context, pairs)
    info = context.set_index("arm")
    batch_of_base = dict(zip(context["base"], context["batch_size"], strict=False))
    smaller = {min(p, key=lambda x: batch_of_base.get(x, math.inf)) for p in pairs if len(p) == 2}
    for arm, df in binned.groupby("arm", sort=False):
        mid = (df["bin_start"] + df["bin_end"]) / 2e6
        running = info.loc[arm, "state"] not in ("completed", "finished")
        label = labels.get(str(arm), str(arm)) + (" — running" if running else "")
        style = "--" if info.loc[arm, "base"] in smaller else "-"
        ax.plot(mid, df["mean"], ls=style, marker="o", ms=2.5, color=colour[arm], label=label)
        se = df["se"].fillna(0.0)
        ax.fill_between(mid, df["mean"] - se, df["mean"] + se, alpha=0.2, color=colour[arm])
    ax.set_xlabel("tokens consumed since branching (millions)")
    ax.set_ylabel("training loss (nats/token), bin mean ± SE")
    ax.grid(alpha=0.3)
    if binned["arm"].nunique() <= 16:
        ax.legend(fontsize=7, title="arm (batch, rule)", title_fontsize=7)
        ax.set_title(title)
    else:  # a legend of that many entries would cover the curves
        ax.set_title(f"{title} ({binned['arm'].nunique()} arms; pairs share a colour)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _half_width(df: pd.DataFrame, level: float) -> np.ndarray:
    q = np.array([stats.t.ppf(0.5 + level / 2, d) if d > 0 else np.nan for d in df["gap_df"]])
    return np.nan_to_num(q * df["gap_se"].to_numpy(np.float64), nan=0.0)


def equivalence(gaps: pd.DataFrame, pairs: pd.DataFrame, skip_tokens: int, path: Path, title: str) -> None:
    """Per pair: display bins with their intervals, the verdict segments as boxes, +-delta, the verdict."""
    plt = _pyplot()
    names = list(dict.fromkeys(pairs["pair"]))
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), dpi=150, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        row = pairs[pairs["pair"] == name].iloc[0]
        level = 1 - 2 * float(row["alpha"])
        mine = gaps[gaps["pair"] == name]
        bins, segments = mine[mine["unit"] == "bin"], mine[mine["unit"] == "segment"]
        delta = float(row["delta"])
        if np.isfinite(delta):
            ax.axhspan(-delta, delta, color="tab:green", alpha=0.12, label=f"±δ = {delta:.3g} nats")
        if skip_tokens > 0:
            ax.axvspan(0, skip_tokens / 1e6, color="gray", alpha=0.15, label="skipped (transient)")
        ax.axhline(0.0, color="black", lw=0.8)
        for seg in segments.itertuples():
            h = _half_width(pd.DataFrame([seg._asdict()]), level)[0]
            ax.add_patch(
                plt.Rectangle(
                    (seg.bin_start / 1e6, seg.gap - h),
                    (seg.bin_end - seg.bin_start) / 1e6,
                    2 * h,
                    color="tab:orange",
                    alpha=0.25,
                    lw=0,
                )
            )
        ax.plot([], [], color="tab:orange", alpha=0.4, lw=6, label=f"segment {level:.0%} CI (verdict)")
        mid = (bins["bin_start"] + bins["bin_end"]) / 2e6
        ax.errorbar(
            mid,
            bins["gap"],
            yerr=_half_width(bins, level),
            fmt="o",
            ms=3,
            capsize=2,
            label=f"bin gap, {level:.0%} CI",
        )
        a, b = name.split("-", 1)
        ax.set_title(f"{name}: loss({a}) − loss({b}) on the same samples", fontsize=9)
        ax.text(
            0.02,
            0.95,
            f"{row['verdict']} (reach {row['reach']:.3g})",
            transform=ax.transAxes,
            va="top",
            fontsize=9,
            weight="bold",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
        )
        ax.set_xlabel("tokens consumed since branching (millions)")
        ax.set_ylabel("paired loss gap (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pairing(pairs: pd.DataFrame, path: Path, title: str) -> None:
    """Per pair: per-window noise of the unpaired and the paired gap (what pairing buys)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(pairs) + 2), 4.2), dpi=150)
    x = np.arange(len(pairs))
    ax.bar(
        x - 0.2,
        pairs["unpaired_noise"],
        width=0.4,
        label="unpaired: the two arms' window means",
        color="tab:gray",
    )
    ax.bar(x + 0.2, pairs["paired_noise"], width=0.4, label="paired: their difference on the same samples")
    ax.set_ylim(0, 1.25 * float(np.nanmax(pairs["unpaired_noise"])) if len(pairs) else 1)
    for i, gain in enumerate(pairs["pairing_gain"]):
        if np.isfinite(gain):
            ax.annotate(
                f"×{gain:.1f} SE\n×{gain**2:.0f} tokens",
                (i, float(pairs["unpaired_noise"].iloc[i])),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(x, pairs["pair"])
    ax.set_ylabel("per-window noise of the gap (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


VERDICT_MARKERS: dict[Verdict, tuple[str, str]] = {
    Verdict.EQUIVALENT: ("o", "tab:green"),
    Verdict.NOT_EQUIVALENT: ("X", "tab:red"),
}


def regime(pairs: pd.DataFrame, edges: tuple[float, float], path: Path, title: str) -> None:
    """Per pair: |paired gap| / op spread (with its CI) against B / B_noise of the pair's larger-batch
    arm, the marker its verdict: where the rule breaks, against where the batch meets the noise scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    larger_a = pairs["batch_a"] >= pairs["batch_b"]
    x = np.where(larger_a, pairs["b_over_noise_a"], pairs["b_over_noise_b"]).astype(np.float64)
    spread = pairs["op_spread"].to_numpy(np.float64)
    y = pairs["mean_gap"].abs().to_numpy(np.float64) / spread
    low = np.maximum(0.0, np.minimum(pairs["ci_low"].abs(), pairs["ci_high"].abs()) / spread)
    low[np.sign(pairs["ci_low"]) != np.sign(pairs["ci_high"])] = 0.0  # the CI holds 0
    high = np.maximum(pairs["ci_low"].abs(), pairs["ci_high"].abs()).to_numpy(np.float64) / spread
    shown = np.isfinite(x) & np.isfinite(y) & (x > 0)
    ax.axvspan(
        edges[0],
        edges[1],
        color="tab:orange",
        alpha=0.1,
        label=f"B / B_noise in [{edges[0]:g}, {edges[1]:g})",
    )
    ax.axvline(1.0, color="tab:orange", lw=1)
    for i in np.flatnonzero(shown):
        verdict = Verdict(str(pairs["verdict"].iloc[i]))
        marker, colour = VERDICT_MARKERS.get(verdict, ("s", "tab:gray"))
        ax.errorbar(
            x[i], y[i], yerr=[[y[i] - low[i]], [high[i] - y[i]]], fmt=marker, color=colour, ms=7, capsize=3
        )
        ax.annotate(
            str(pairs["pair"].iloc[i]), (x[i], y[i]), textcoords="offset points", xytext=(6, 4), fontsize=7
        )
    for verdict, (marker, colour) in [*VERDICT_MARKERS.items(), (Verdict.INCONCLUSIVE, ("s", "tab:gray"))]:
        ax.plot([], [], marker, color=colour, label=verdict)
    if "delta" in pairs and np.isfinite(spread).any():
        margin = float(np.nanmedian(pairs["delta"].to_numpy(np.float64) / spread))
        if np.isfinite(margin):
            ax.axhline(margin, color="tab:green", ls="--", lw=1, label=f"margin δ / spread = {margin:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("B / B_noise of the larger-batch arm (B_noise over the compared window)")
    ax.set_ylabel("|paired gap| / operating-point spread")
    _finish(fig, ax, path, title, "" if shown.any() else "no pair has a measured B_noise")


def critical_batch(branch: pd.DataFrame, fit: pd.DataFrame, path: Path, title: str) -> None:
    """The critical batch per branch point with its interval, B_noise and the McCandlish B_crit there."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    x = branch["branch_tokens"].to_numpy(np.float64)
    if not np.isfinite(x).all():
        x = np.arange(len(branch), dtype=np.float64)
        ax.set_xticks(x, branch["branch"])
    else:
        ax.set_xlabel("branch point (tokens trained: the warmup's, or the checkpoint's record)")
    mid = branch["critical_batch"].to_numpy(np.float64)
    lo, hi = branch["critical_low"].to_numpy(np.float64), branch["critical_high"].to_numpy(np.float64)
    ax.errorbar(x, mid, yerr=[mid - lo, hi - mid], fmt="o", capsize=4, label="critical batch (branched, CI)")
    ax.plot(x, branch["b_noise"], "s--", color="tab:orange", label="B_noise (smallest arm, window)")
    for i, row in enumerate(branch.itertuples()):
        mine = fit[fit["branch"] == row.branch]
        if len(mine):
            ax.plot([x[i]] * len(mine), mine["b_crit"], "^", color="tab:green", alpha=0.6)
    ax.plot([], [], "^", color="tab:green", label="B_crit (McCandlish fit, per target)")
    ax.set_yscale("log")
    ax.set_ylabel("batch (sequences)")
    _finish(fig, ax, path, title, "")


def mccandlish(fit: pd.DataFrame, path: Path, title: str) -> None:
    """Per target loss: the measured (S, E) points and the fitted hyperbola (S/S_min - 1)(E/E_min - 1) = 1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    for i, row in enumerate(fit.itertuples()):
        colour = f"C{i % 10}"
        points = [tuple(map(float, p.split(":"))) for p in str(row.points).split()]
        b = np.array([p[0] for p in points])
        s = np.array([p[1] for p in points])
        ax.plot(s, b * s, "o", color=colour)
        grid = np.geomspace(b.min() / 4, b.max() * 4, 100)
        steps = row.s_min * (1 + row.b_crit / grid)
        ax.plot(
            steps,
            grid * steps,
            "-",
            color=colour,
            lw=1,
            label=f"{row.branch} loss {row.target_loss:.3f}: B_crit {row.b_crit:.3g} "
            f"[{row.b_crit_low:.3g}, {row.b_crit_high:.3g}]",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps S to the target loss")
    ax.set_ylabel("samples E = B S (sequences)")
    _finish(fig, ax, path, title, "" if len(fit) else "no target reached by three arms", legend=6)


def _finish(fig: Any, ax: Any, path: Path, title: str, empty: str, legend: int = 7) -> None:
    """Title, log grid and legend of a small figure, `empty` across it when it has no data; saved."""
    if empty:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
