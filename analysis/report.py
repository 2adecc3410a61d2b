"""Write a comparison to `<out>/`: pairs.csv/.md/.tex, bins.csv, arms.csv, runs.parquet, three plots.

`pairs.md` (also printed) holds, for training and (where logged) validation loss, the pair table
and each pair's verdict in words, then the per-arm context (noise, B_simple, speed, cost).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import plots as plot
from analysis.collect import long_table, run_dir_arms
from analysis.tables import (
    ARM_COLUMNS,
    BinSpec,
    Margin,
    PairGrid,
    arm_context,
    arms_of,
    bin_arms,
    op_spreads,
    pair_table,
    verdict_line,
)
from sweep.manifest import read_manifest

PAIR_COLUMNS = ["pair", "batch_a", "batch_b", "bins", "mean_gap", "gap_se", "t", "same_sign", "max_abs_gap"]
PAIR_COLUMNS += [
    "op_spread",
    "gap_over_spread",
    "delta",
    "tost_p",
    "verdict",
    "noise_ratio",
    "sqrt_batch_ratio",
]
TEX_COLUMNS = {
    "pair": "Pair",
    "batch_a": "$B_a$",
    "batch_b": "$B_b$",
    "mean_gap": "Mean gap",
    "gap_se": "SE",
    "same_sign": "Same sign",
    "op_spread": "Op. spread",
    "delta": r"$\delta$",
    "tost_p": "TOST $p$",
    "verdict": "Verdict",
}
NOTES = (
    "mean_gap = loss(a) - loss(b) averaged over the pair's common token bins (nats); gap_se its SE over "
    "bins; "
    "same_sign = share of bins with the sign of the mean; op_spread = |mean gap| between operating points at "
    "equal batch size (gap_over_spread << 1: the rule maps one batch size onto the other); delta = the "
    "equivalence margin, tost_p = two one-sided tests against +-delta; noise_ratio = per-step loss noise of "
    "the smaller-batch arm over the larger one, sqrt_batch_ratio what the noise-dominated regime predicts."
)


@dataclass
class Comparison:
    """What to compare and how: pairs, binning, margin, and a title for tables and plots."""

    pairs: list[list[str]]
    spec: BinSpec = field(default_factory=BinSpec)
    margin: Margin = field(default_factory=Margin)
    title: str = "comparison"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def to_markdown(df: pd.DataFrame, columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += [
        "| " + " | ".join(fmt(v) for v in row) + " |"
        for row in df.reindex(columns=columns).itertuples(index=False)
    ]
    return "\n".join(lines)


def to_latex(df: pd.DataFrame, title: str) -> str:
    """A booktabs table of the pairs (both metrics), for `\\input{}` in a paper."""
    cols = list(TEX_COLUMNS)

    def cell(v: Any) -> str:
        return (
            fmt(v)
            .replace("_", r"\_")
            .replace("%", r"\%")
            .replace("-inf", r"$-\infty$")
            .replace("inf", r"$\infty$")
        )

    lines = [
        "% " + title + " (written by `python -m analysis`; needs \\usepackage{booktabs})",
        r"\begin{tabular}{l" + "r" * (len(cols) - 2) + "l}",
        r"\toprule",
        " & ".join(TEX_COLUMNS.values()) + r" \\",
    ]
    for metric, part in df.groupby("metric", sort=False):
        lines += [r"\midrule", rf"\multicolumn{{{len(cols)}}}{{l}}{{\emph{{{metric} loss}}}} \\"]
        lines += [" & ".join(cell(v) for v in row) + r" \\" for row in part[cols].itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def report(
    runs: pd.DataFrame, cmp: Comparison, out: Path, missing: list[str] | None = None, plots: bool = True
) -> dict[str, Any]:
    """Compute every table, write every file, print `pairs.md`; returns the tables by name (and `out`)."""
    if not cmp.pairs:
        raise ValueError("no pairs to compare: the experiment declares none; give analysis.pairs='[[A,B]]'")
    if runs.empty:
        raise LookupError("no arm has logged any rows yet: nothing to compare")
    out.mkdir(parents=True, exist_ok=True)
    # The merged table is the largest file: write it while the tables are computed (the parquet
    # writer releases the GIL), which halves the wall time on 100 runs x 100k rows.
    background = ThreadPoolExecutor(max_workers=1)
    writer = background.submit(runs.to_parquet, out / "runs.parquet", index=False)
    arms = arms_of(runs, cmp.spec)
    usable = [p for p in cmp.pairs if set(p) <= set(arms)]
    missing = sorted(set(missing or []) | {a for p in cmp.pairs for a in p} - set(arms))
    grids = PairGrid(cmp.spec)
    spread = op_spreads(arms, usable, grids)  # once for both metrics: the yardstick is training loss
    tables, gaps = [], []
    for kind in ("train", "val"):
        if any(len(arm.series(kind).tokens) for arm in arms.values()):
            t, g = pair_table(arms, usable, grids, spread, cmp.margin, kind)
            tables.append(t)
            gaps.append(g)
    pairs = (
        pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["metric", *PAIR_COLUMNS])
    )
    gap_bins = pd.concat(gaps, ignore_index=True) if gaps else pd.DataFrame()
    binned = bin_arms(arms, cmp.spec)
    context = arm_context(arms)

    pairs.to_csv(out / "pairs.csv", index=False)
    binned.to_csv(out / "bins.csv", index=False)
    context.to_csv(out / "arms.csv", index=False)
    (out / "pairs.tex").write_text(to_latex(pairs, cmp.title))

    text = [f"# {cmp.title}: pairwise loss gap vs tokens", ""]
    for metric, part in pairs.groupby("metric", sort=False):
        n_bins = ", ".join(f"{r.pair} {r.bins}" for r in part.itertuples())
        text += [f"## {metric} loss (bins: {n_bins})", "", to_markdown(part, PAIR_COLUMNS), ""]
        text += [f"- {verdict_line(row)}" for row in part.to_dict("records")] + [""]
    text += ["## arms", "", to_markdown(context, ARM_COLUMNS), "", NOTES, ""]
    if missing:
        text += [f"No metrics yet for arm(s) {', '.join(missing)}: their pairs are left out.", ""]
    stopped = context[(context["state"] != "completed") & (context["state"] != "finished")]
    for row in stopped.itertuples():
        text += [
            f"Arm {row.arm} is {row.state} at {row.tokens:,} tokens: its pairs are compared up to there.",
            "",
        ]
    (out / "pairs.md").write_text("\n".join(text))

    if plots:
        draw(out, cmp.title, binned, gap_bins, context)
    writer.result()  # re-raises a failed write
    background.shutdown()
    print("\n".join(text))
    for name in ("pairs.md", "pairs.csv", "pairs.tex", "bins.csv", "arms.csv", "runs.parquet"):
        print(f"wrote {out / name}")
    for name in ("curves.png", "equivalence.png", "noise.png"):
        if (out / name).exists():
            print(f"wrote {out / name}")
    return {"pairs": pairs, "bins": binned, "arms": context, "gaps": gap_bins, "out": out}


def draw(out: Path, title: str, binned: pd.DataFrame, gap_bins: pd.DataFrame, context: pd.DataFrame) -> None:
    """curves.png, equivalence.png (training-loss gaps) and noise.png."""
    if len(binned):
        plot.curves(binned, out / "curves.png", f"{title}: loss vs tokens")
    if len(gap_bins):
        train_gaps = gap_bins[gap_bins["metric"] == "train"]
        plot.equivalence(train_gaps, out / "equivalence.png", f"{title}: per-bin gap and margin")
    if len(context):
        plot.noise(context, out / "noise.png", f"{title}: loss noise vs batch")


def analyze(sweep_dir: str | Path, cmp: Comparison | None = None, out: Path | None = None) -> dict[str, Any]:
    """Compare a sweep's arms from its run dirs: the manifest's pairs plus `cmp.pairs`."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    cmp = cmp or Comparison(pairs=[])
    declared = [list(p) for p in manifest.get("pairs", [])]
    pairs = declared + [list(p) for p in cmp.pairs if list(p) not in declared]
    found = run_dir_arms(manifest)
    arms = [name for name, job in manifest["jobs"].items() if job["kind"] == "arm"]
    title = cmp.title if cmp.title != "comparison" else str(manifest.get("experiment", sweep_dir.name))
    full = Comparison(pairs, cmp.spec, cmp.margin, title)
    missing = sorted(set(arms) - {a.arm for a in found})
    return report(long_table(found), full, out or sweep_dir / "results", missing=missing)
