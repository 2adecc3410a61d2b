"""Write a comparison to `<out>/`: pairs.md/.csv/.tex, gaps.csv, bins.csv, arms.csv, runs.parquet, plots.

`pairs.md` (also printed) starts with one line per pair and metric (the verdict, the mean gap and
its interval, the margin), then each verdict in words, the detailed tables, and the per-arm
context; it reads at 100 columns.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import cbs
from analysis import plots as plot
from analysis.arms import REGIME_EDGES, arm_context, arms_of, curve_bins
from analysis.collect import ArmRows, long_table, run_dir_arms
from analysis.ladders import best_of_ladders
from analysis.options import BinSpec, Margin
from analysis.pairs import Spread, pair_name, pair_rows, ranking, yardstick_spreads
from analysis.verdict import verdict_line
from records.atomic import write_json_atomic
from records.manifest import read_manifest

SUMMARY_COLUMNS = ["pair", "metric", "verdict", "mean_gap", "ci_low", "ci_high", "reach", "delta"]
DETAIL_COLUMNS = ["pair", "metric", "batch_a", "batch_b", "replicates", "windows", "segments", "from_tokens"]
DETAIL_COLUMNS += ["to_tokens", "gap_se", "same_sign", "op_spread", "gap_over_spread"]
PAIRING_COLUMNS = ["pair", "paired_noise", "unpaired_noise", "pairing_gain"]
REGIME_COLUMNS = ["pair", "verdict", "batch_a", "b_over_noise_a", "regime_a", "batch_b", "b_over_noise_b"]
REGIME_COLUMNS += ["regime_b"]
ARM_MD_COLUMNS = ["arm", "batch_size", "state", "tokens", "loss_std", "b_noise", "b_noise_tokens"]
ARM_MD_COLUMNS += ["b_over_noise", "regime"]
TEX_COLUMNS = {
    "pair": "Pair",
    "batch_a": "$B_a$",
    "batch_b": "$B_b$",
    "mean_gap": "Mean gap",
    "ci_low": "CI low",
    "ci_high": "CI high",
    "reach": "Reach",
    "delta": r"$\delta$",
    "verdict": "Verdict",
}
NOTES = """\
How to read it. Training loss: the two arms are compared on matched windows (the samples both
consumed between two shared step boundaries), so the gap is paired sample for sample; mean_gap is
loss(a) - loss(b) over the compared tokens, with its (1 - 2 alpha) CI from an autocorrelation-
robust standard error (AR(1)-prewhitened EWC, t intervals). The verdict cuts the range into
`segments` token ranges: equivalent = every segment's CI inside +-delta (reach = the largest |CI
bound| < delta); NOT equivalent = some segment's Bonferroni-widened CI entirely outside +-delta;
otherwise inconclusive. Validation loss: paired over the same validation sequences at each common
evaluation (exact SE), mean_gap = the gap at the last one, the verdict over evaluations. delta =
analysis.margin, or margin_fraction x op_spread (|gap| between operating points at the same batch
size). pairing_gain = unpaired / paired per-window noise: what pairing buys in SE (its square in
tokens). Display bins (gaps.csv, equivalence.png) never enter the verdict.
Regime: B_noise = sum tr(Sigma) / sum |G|^2 over each arm's measured steps after skip_tokens (the
gradient noise scale B_simple of McCandlish et al. 2018, in sequences; b_noise_tokens = x seq_len).
B / B_noise < 0.25: noise-dominated (where the square-root rule is expected to hold); < 1: near
B_noise; otherwise beyond it. arms.csv also has b_simple, the median of the trainer's smoothed one."""


@dataclass
class Comparison:
    """What to compare and how: pairs, binning, margin, and a title for tables and plots."""

    pairs: list[list[str]]  # the questions the experiment declares
    spec: BinSpec = field(default_factory=BinSpec)
    margin: Margin = field(default_factory=Margin)
    title: str = "comparison"
    ladder: list[str] = field(default_factory=list)  # a batch-size ladder (the cbs preset), smallest first
    epsilon: float = 0.01  # the branched critical batch's loss tolerance (nats)
    # the McCandlish fit's target losses (empty: automatic)
    targets: list[float] = field(default_factory=list)
    experiment_skip: bool = False  # skip the tokens the experiment declares (its branch transient)
    # pairs that must NOT match (the instrument discriminates): compared, marked, never in δ
    controls: list[list[str]] = field(default_factory=list)
    # the operating-point pairs whose spread sets δ (analysis/pairs.py); empty: the experiment's
    yardstick: list[list[str]] = field(default_factory=list)
    extra: list[list[str]] = field(default_factory=list)  # pairs asked for on top (analysis.pairs)
    # The sequential verdict's decisions (experiment.stop_when_decided), by pair name, and its looks.
    decided: dict[str, dict[str, Any]] = field(default_factory=dict)
    looks: int = 0
    run_pairs: list[str] = field(default_factory=list)  # the pairs (as named in the tables) the looks judged
    # a variant's arms at several lrs, by variant (analysis/ladders.py): ranked by their best arm
    lr_ladders: dict[str, list[str]] = field(default_factory=dict)

    @property
    def compared(self) -> list[list[str]]:
        """Every pair that gets a verdict: the questions, the controls, then the extra pairs."""
        out: list[list[str]] = []
        for pair in [*self.pairs, *self.controls, *self.extra]:
            if list(pair) not in out:
                out.append(list(pair))
        return out


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


def check_pairs(pairs: list[list[str]], found: list[ArmRows], known: set[str]) -> None:
    """Refuse a pair that names an arm the sweep does not have (a typo), before anything is written."""
    names = known | {a.arm for a in found} | {a.base or a.arm for a in found}
    unknown = sorted({x for p in pairs for x in p} - names)
    if unknown:
        raise LookupError(
            f"pair(s) name unknown arm(s) {', '.join(unknown)}; the sweep's arms: {', '.join(sorted(names))}"
        )


@dataclass
class Tables:
    """Every table of a comparison; `report` adds where it wrote them and, with a batch ladder, the
    critical batch size."""

    pairs: pd.DataFrame  # one row per pair and metric: the verdict and its numbers (pairs.csv)
    not_compared: list[str]  # declared pairs that could not be compared, each with why
    yardstick: pd.DataFrame  # the yardstick's pairs and the margin they give (yardstick.csv)
    gaps: pd.DataFrame  # per pair: display bins, verdict segments, evaluations (gaps.csv)
    bins: pd.DataFrame  # every arm's training loss per bin (bins.csv)
    arms: pd.DataFrame  # per arm run: regime and context (arms.csv)
    ranking: pd.DataFrame  # arms by final validation loss (ranking.csv)
    runs: pd.DataFrame  # the merged long table (runs.parquet)
    cbs: pd.DataFrame | None = None  # the branched critical batch (cbs.csv)
    cbs_fit: pd.DataFrame | None = None  # the McCandlish fit (cbs_fit.csv)
    ladders: pd.DataFrame | None = None  # each lr ladder's best arm, ranked (ladders.csv)
    out: Path | None = None
    title: str = ""


def compare(found: list[ArmRows], cmp: Comparison, runs: pd.DataFrame | None = None) -> Tables:
    """Every table of a comparison (nothing written); `runs`, the merged long table of `found`, is
    made here unless given."""
    runs = long_table(found) if runs is None else runs
    arms = arms_of(runs, cmp.spec, {a.arm: a for a in found})
    spreads = yardstick_spreads(arms, cmp.yardstick, cmp.spec)
    pairs, gaps, skipped = pair_rows(arms, cmp.compared, cmp.spec, cmp.margin, spreads, cmp.controls)
    if pairs.empty:
        pairs = pd.DataFrame(
            columns=list(dict.fromkeys([*SUMMARY_COLUMNS, *DETAIL_COLUMNS, "alpha", "role"]))
        )
    return Tables(
        pairs,
        skipped,
        yardstick_table(spreads, cmp),
        gaps,
        curve_bins(arms, cmp.spec),
        arm_context(arms),
        ranking(arms, pairs),
        runs,
        ladders=best_of_ladders(arms, cmp.lr_ladders, cmp.spec, cmp.margin, spreads)
        if cmp.lr_ladders
        else None,
        title=cmp.title,
    )


def report(
    found: list[ArmRows],
    cmp: Comparison,
    out: Path,
    missing: list[str] | None = None,
    plots: bool = True,
    labels: dict[str, str] | None = None,
) -> Tables:
    """Compute every table, write every file, print `pairs.md`; returns the tables and where.

    `labels`: per arm run, its legend text in the curves plot (arm, batch, rule)."""
    if not cmp.compared:
        raise ValueError("no pairs to compare: the experiment declares none; give analysis.pairs='[[A,B]]'")
    if not found:
        raise LookupError("no arm has logged any rows yet: nothing to compare")
    keep_other_analysis(out, cmp)
    runs = long_table(found)
    # The merged table is the largest file: write it while the tables are computed (the parquet
    # writer releases the GIL).
    background = ThreadPoolExecutor(max_workers=1)
    writer = background.submit(runs.to_parquet, out / "runs.parquet", index=False)
    tables = compare(found, cmp, runs)
    if cmp.looks:
        tables.pairs = with_decisions(tables.pairs, cmp.decided)
    pairs, context = tables.pairs, tables.arms
    pairs.to_csv(out / "pairs.csv", index=False)
    tables.gaps.to_csv(out / "gaps.csv", index=False)
    tables.bins.to_csv(out / "bins.csv", index=False)
    context.to_csv(out / "arms.csv", index=False)
    tables.ranking.to_csv(out / "ranking.csv", index=False)
    if tables.ladders is not None:
        tables.ladders.to_csv(out / "ladders.csv", index=False)
    (out / "pairs.tex").write_text(to_latex(pairs, cmp.title))
    tables.yardstick.to_csv(out / "yardstick.csv", index=False)
    text = markdown(tables, cmp, missing or [])
    if cmp.ladder:
        tables.cbs, tables.cbs_fit = critical_batch(tables, cmp, out, plots)
        text += cbs_markdown(tables.cbs, tables.cbs_fit)
    (out / "pairs.md").write_text(text)
    if plots:
        draw(out, cmp, tables, labels or {})
    writer.result()  # re-raises a failed write
    background.shutdown()
    write_json_atomic(out / OPTIONS_FILE, {"options": options_of(cmp), "written": time.time()})
    print(text)
    written = ["pairs.md", "pairs.csv", "pairs.tex", "gaps.csv", "bins.csv", "arms.csv", "ranking.csv"]
    written += ["yardstick.csv"] + (["ladders.csv"] if tables.ladders is not None else [])
    written += ["runs.parquet"]
    for name in written + (["cbs.csv", "cbs_fit.csv"] if cmp.ladder else []):
        print(f"wrote {out / name}")
    for name in plot.FIGURES:
        if (out / name).exists():
            print(f"wrote {out / name}")
    tables.out = out
    return tables


OPTIONS_FILE = "analysis.json"  # the options an analysis in `out` was made with


def options_of(cmp: Comparison) -> dict[str, Any]:
    """What decides a comparison's numbers (everything in `cmp` but its title), as plain JSON."""
    return json.loads(json.dumps({k: v for k, v in asdict(cmp).items() if k != "title"}))


def keep_other_analysis(out: Path, cmp: Comparison) -> None:
    """Make `out` ready for this analysis. One made with the same options is replaced (its tables
    are recomputed from the run files, on the arms' rows so far); one made with other options (or
    by an older version) is moved aside to `<out>-<when it was written>` and stays, said aloud."""
    if (out / "pairs.md").exists():
        try:
            before = json.loads((out / OPTIONS_FILE).read_text())
        except (OSError, ValueError):
            before = {}
        if before.get("options") != options_of(cmp):
            written = before.get("written") or (out / "pairs.md").stat().st_mtime
            aside = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(written))}")
            aside = aside if not aside.exists() else aside.with_name(f"{aside.name}-{os.getpid()}")
            out.rename(aside)
            print(f"the analysis in {out} was made with other options: kept as {aside}")
        else:
            print(f"replacing the analysis in {out} (same options, the arms' rows so far)")
    out.mkdir(parents=True, exist_ok=True)


def critical_batch(
    tables: Tables, cmp: Comparison, out: Path, plots: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cbs.csv / cbs.png (branched) and cbs_fit.csv / cbs_fit.png (McCandlish) of the ladder."""
    found = tables.pairs
    level = 1 - 2 * float(found["alpha"].iloc[0]) if len(found) and "alpha" in found else 0.9
    branch = cbs.branched(found, tables.gaps, tables.arms, cmp.ladder, cmp.epsilon)
    fit = cbs.mccandlish(tables.bins, tables.arms, cmp.ladder, cmp.targets, level)
    branch.to_csv(out / "cbs.csv", index=False)
    fit.to_csv(out / "cbs_fit.csv", index=False)
    if plots:
        plot.critical_batch(branch, fit, out / "cbs.png", f"{cmp.title}: critical batch size")
        plot.mccandlish(fit, out / "cbs_fit.png", f"{cmp.title}: steps and samples to target loss")
    return branch, fit


def cbs_markdown(branch: pd.DataFrame, fit: pd.DataFrame) -> str:
    """The critical-batch sections of pairs.md (batches in sequences)."""
    return "\n".join(
        [
            "",
            "## critical batch size, branched (batches and B_noise in sequences)",
            "",
            to_markdown(
                branch, ["branch", "epsilon", "critical_batch", "critical_low", "critical_high", "b_noise"]
            ),
            "",
            "critical_batch: the largest batch whose loss at the window's end stays within epsilon of the",
            "smallest batch's (its last segment's paired gap); [critical_low, critical_high]: from the gaps'",
            "CIs (surely within up to low; surely beyond above high). b_noise: the smallest arm's B_noise.",
            "",
            "## critical batch size, McCandlish fit (S = S_min (1 + B_crit / B) per target loss)",
            "",
            to_markdown(
                fit, ["branch", "target_loss", "b_crit", "b_crit_low", "b_crit_high", "s_min", "e_min"]
            ),
            "",
        ]
    )


def yardstick_table(spreads: dict[str, Spread], cmp: Comparison) -> pd.DataFrame:
    """One row per sweep variant and yardstick pair: its |mean gap|, and the δ it gives."""
    rows = [
        {
            "variant": variant,
            "pair": pair,
            "abs_gap": gap,
            "spread": spread.value,
            "delta": cmp.margin.delta(spread.value),
        }
        for variant, spread in spreads.items()
        for pair, gap in [*spread.gaps.items(), *((m, math.nan) for m in spread.missing)]
    ]
    return pd.DataFrame(rows, columns=["variant", "pair", "abs_gap", "spread", "delta"])


def margin_text(cmp: Comparison, table: pd.DataFrame) -> list[str]:
    """Where δ comes from, in words: the declared yardstick's gaps, or a margin given in nats."""
    m = cmp.margin
    if cmp.ladder and m.nats == cmp.epsilon:
        return [f"δ = experiment.cbs.epsilon = {fmt(m.nats)} nats: the ladder's loss tolerance."]
    measured = table[table["abs_gap"].notna()] if len(table) else table
    if not cmp.yardstick:
        if m.nats:
            return [f"δ = analysis.margin = {fmt(m.nats)} nats (this experiment declares no yardstick)."]
        return [
            "No margin: this experiment declares no yardstick (experiment.yardstick: pairs of arms at one "
            "batch size with different operating points). Give analysis.margin=NATS, or "
            "analysis.yardstick='[[X,Y]]'."
        ]
    lines = []
    for variant, part in table.groupby("variant", sort=False) if len(table) else []:
        got = measured[measured["variant"] == variant]
        gaps = ", ".join(f"|{p}| {fmt(g)}" for p, g in zip(got["pair"], got["abs_gap"], strict=True))
        where = f" [{variant}]" if variant else ""
        if m.nats:
            lines.append(
                f"δ{where} = analysis.margin = {fmt(m.nats)} nats; the yardstick: {gaps or 'none measured'}."
            )
        elif len(got):
            lines.append(
                f"δ{where} = {m.fraction:g} × mean({gaps}) = {fmt(float(part['delta'].iloc[0]))} nats: "
                "the spread between the declared operating-point pairs (experiment.yardstick)."
            )
        lost = part[part["abs_gap"].isna()]["pair"].tolist()
        if lost:
            lines.append(f"Yardstick pair(s) not measured{where}: {'; '.join(lost)}.")
        if not len(got) and not m.nats:
            lines.append(f"No margin{where}: no yardstick pair could be measured; give analysis.margin=NATS.")
    return lines


def verdict_table(pairs: pd.DataFrame) -> str:
    """The short table of verdicts: pair, metric, verdict, mean gap with its interval, reach, delta."""
    level = f"{1 - 2 * float(pairs['alpha'].iloc[0]):.0%}" if len(pairs) and "alpha" in pairs else "90%"
    roles = pairs["role"] if "role" in pairs else pd.Series("pair", index=pairs.index)
    rows = pd.DataFrame(
        {
            "pair": [
                f"{p} (control)" if r == "control" else p for p, r in zip(pairs["pair"], roles, strict=True)
            ],
            "metric": pairs["metric"],
            "verdict": pairs["verdict"],
            f"mean gap [{level} CI]": [
                f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) else fmt(m)
                for m, lo, hi in zip(pairs["mean_gap"], pairs["ci_low"], pairs["ci_high"], strict=True)
            ],
            "reach": pairs["reach"],
            "δ": pairs["delta"],
        }
    )
    return to_markdown(rows, list(rows.columns))


def paired_gap_columns(table: pd.DataFrame) -> dict[str, Any]:
    """The columns of a table of arms each paired with another: whom, the validation gap with its
    interval (blank where there is no pair), the verdict."""
    return {
        "vs": table["vs"].fillna(""),
        "val gap [CI]": [
            f"{fmt(g)} [{fmt(lo)}, {fmt(hi)}]" if isinstance(v, str) else ""
            for g, lo, hi, v in zip(
                table["gap"], table["ci_low"], table["ci_high"], table["verdict"], strict=True
            )
        ],
        "verdict": table["verdict"].fillna(""),
    }


def ranking_table(table: pd.DataFrame) -> str:
    """The arms by final validation loss, with the paired gap to the arm each is compared with."""
    rows = pd.DataFrame(
        {
            "arm": table["arm"],
            "B": table["batch_size"],
            "final val loss": table["final_val_loss"].map(fmt),
            **paired_gap_columns(table),
            "regime": table["regime"],
            "state": table["state"],
        }
    )
    return to_markdown(rows, list(rows.columns))


LADDER_NOTE = (
    "Each best arm is chosen on the validation sequences that then measure its gap, which biases "
    "every gap toward the leader (a best-of-k choice): read a narrow interval as no ranking."
)


def ladders_table(table: pd.DataFrame) -> str:
    """Each lr ladder's best arm, best first, with its paired validation gap to the leader's."""
    rows = pd.DataFrame(
        {
            "variant": table["variant"],
            "ladder": table["ladder"],
            "best arm": table["best_arm"],
            "of": table["rungs"],
            "final val loss": table["final_val_loss"].map(fmt),
            **paired_gap_columns(table),
        }
    )
    if set(rows["variant"]) == {""}:
        rows = rows.drop(columns="variant")
    return to_markdown(rows, list(rows.columns))


def markdown(tables: Tables, cmp: Comparison, missing: list[str]) -> str:
    """pairs.md: the verdicts first, at 100 columns, then the detail."""
    pairs, context, ranked = tables.pairs, tables.arms, tables.ranking
    spec = cmp.spec
    window = f"tokens > {spec.skip_tokens:,}" + (
        f" and <= {spec.until_tokens:,}" if spec.until_tokens else ""
    )
    text = [
        f"# {cmp.title}: paired loss gaps",
        "",
        f"Compared on {window}; {spec.segments} verdict segments.",
        "",
    ]
    text += ["## verdicts", "", verdict_table(pairs), ""]
    for line in [*margin_text(cmp, tables.yardstick), *tables.not_compared]:
        text += [*textwrap.wrap(line, 100), ""]
    if pairs.empty:
        reached = int(context["tokens"].max()) if len(context) else 0
        text += textwrap.wrap(
            f"No pair has samples to compare after skip_tokens={spec.skip_tokens:,} (the arms reached "
            f"{reached:,} tokens): give a smaller analysis.skip_tokens (e.g. 0), or let the arms run on.",
            100,
        )
        text += [""]
    for row in pairs.to_dict("records"):
        text += textwrap.wrap(verdict_line(row), 100, initial_indent="- ", subsequent_indent="  ")
    text += [""]
    if cmp.looks:
        text += sequential_text(cmp)
    if len(ranked):
        text += [
            "## ranking by final validation loss (gap: this arm minus the one it is compared with)",
            "",
            ranking_table(ranked),
            "",
        ]
    if tables.ladders is not None and len(tables.ladders):
        text += [
            "## lr ladders: each variant at its best lr (gap: its best arm minus the leader's)",
            "",
            ladders_table(tables.ladders),
            "",
            *textwrap.wrap(LADDER_NOTE, 100),
            "",
        ]
    text += ["## detail", "", to_markdown(pairs, DETAIL_COLUMNS), ""]
    train = pairs[pairs["metric"] == "train"]
    if len(train):
        text += [
            "## what pairing buys (training loss, per window)",
            "",
            to_markdown(train, PAIRING_COLUMNS),
            "",
            "## regime (training loss; B / B_noise over the compared window, B_noise in sequences)",
            "",
            to_markdown(train, REGIME_COLUMNS),
            "",
        ]
    text += ["## arms", "", to_markdown(context, ARM_MD_COLUMNS), "", NOTES, ""]
    if missing:
        text += [f"No metrics yet for arm(s) {', '.join(missing)}: their pairs are left out.", ""]
    stopped = context[~context["state"].isin(["completed", "finished", "decided"])]
    for row in context[context["state"] == "decided"].itertuples():
        text += [f"Arm {row.arm} stopped at {row.tokens:,} tokens once its pairs were decided.", ""]
    for row in stopped.itertuples():
        text += [
            f"Arm {row.arm} is {row.state} at {row.tokens:,} tokens: its pairs are compared up to where "
            "both arms got, and their verdicts may still change.",
            "",
        ]
    return "\n".join(text)


def with_decisions(pairs: pd.DataFrame, decided: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The pairs table with each pair's sequential decision on its training-loss row:
    `sequential` (the verdict, or `undecided`), `decided_look` and `decided_tokens`."""
    if pairs.empty:
        return pairs
    train = pairs["metric"] == "train"
    got = [decided.get(p, {}) for p in pairs["pair"]]
    pairs = pairs.copy()
    pairs["sequential"] = [
        d.get("verdict", "undecided") if t else "" for d, t in zip(got, train, strict=True)
    ]
    pairs["decided_look"] = [d.get("look") for d in got]
    pairs["decided_tokens"] = [d.get("tokens") for d in got]
    pairs["fixed_at_decision"] = [d.get("fixed", "") for d in got]
    return pairs


def sequential_text(cmp: Comparison) -> list[str]:
    """pairs.md's account of the decisions that stopped arms (experiment.stop_when_decided)."""
    text = [
        "## sequential verdicts (experiment.stop_when_decided)",
        "",
        f"Each pair was judged at {cmp.looks} looks on the budget's segments; the first look that "
        "decided it stopped its arms (docs/verdict.md). Recomputed here from the rows, as the arms "
        "computed them. The verdicts above cut the range run (past the decision, where an arm "
        "ran on) into their own segments, so they can differ where a segment straddles the decision:",
        "",
    ]
    for name in cmp.run_pairs:  # the pairs both of whose arms ran (the others are named above)
        d = cmp.decided.get(name)
        text += [
            f"- {name}: {d['verdict']} at look {d['look']}/{cmp.looks} ({d['tokens']:,} tokens), "
            f"mean gap {d['mean_gap']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}], "
            f"δ {d['delta']:.3g}; the fixed-budget test on the same range and segments: {d['fixed']}"
            if d
            else f"- {name}: undecided at the looks taken"
        ]
    return [*text, ""]


def draw(out: Path, cmp: Comparison, tables: Tables, labels: dict[str, str]) -> None:
    """curves.png, equivalence.png (training-loss gaps) and pairing.png."""
    if len(tables.bins):
        title = f"{cmp.title}: loss vs tokens"
        plot.curves(tables.bins, tables.arms, cmp.compared, labels, out / "curves.png", title)
    gaps, pairs = tables.gaps, tables.pairs
    if len(gaps) and (gaps["metric"] == "train").any():
        plot.equivalence(
            gaps[gaps["metric"] == "train"],
            pairs[pairs["metric"] == "train"],
            cmp.spec.skip_tokens,
            out / "equivalence.png",
            f"{cmp.title}: paired gap per bin and margin",
        )
    train = pairs[pairs["metric"] == "train"]
    if len(train):
        plot.pairing(train, out / "pairing.png", f"{cmp.title}: what pairing buys")
        title = f"{cmp.title}: the pairs' gaps against the noise scale"
        plot.regime(train.reset_index(drop=True), REGIME_EDGES, out / "regime.png", title)


def sweep_arms(sweep_dir: Path) -> tuple[dict[str, Any], list[ArmRows], list[str], dict[str, str]]:
    """A sweep's manifest, its arms' rows from their run dirs, the arms with none yet, and labels."""
    manifest = read_manifest(sweep_dir)
    found = run_dir_arms(manifest)
    jobs = {name: job for name, job in manifest["jobs"].items() if job["kind"] == "arm"}
    missing = sorted(set(jobs) - {a.arm for a in found})
    labels = {
        name: f"{name} (B={job['derived'].get('batch_size')}, {job['derived'].get('rule', '?')})"
        for name, job in jobs.items()
    }
    return manifest, found, missing, labels


def analyze(sweep_dir: str | Path, cmp: Comparison | None = None, out: Path | None = None) -> Tables:
    """Compare a sweep's arms from its run dirs: the manifest's pairs and controls, then `cmp`'s."""
    sweep_dir = Path(sweep_dir)
    manifest, found, missing, labels = sweep_arms(sweep_dir)
    cmp = cmp or Comparison(pairs=[], experiment_skip=True)
    full = _declared(manifest, cmp)
    if manifest.get("decide"):
        from analysis.stopping import sweep_looks

        full.looks = int(manifest["decide"]["looks"])
        for variant, looked in sweep_looks(sweep_dir).items():
            for pair in looked.judged:
                name = pair_name(pair, variant)
                full.run_pairs.append(name)
                if (d := looked.decided.get(pair_name(pair))) is not None:
                    full.decided[name] = asdict(d)
    # The arms the experiment defines (the manifest records them; older ones: those of its pairs),
    # and the runs of this sweep by name.
    declared = [*manifest.get("pairs", []), *manifest.get("controls", []), *manifest.get("yardstick", [])]
    known = set(manifest.get("arms") or [x for p in declared for x in p])
    for name, job in manifest["jobs"].items():
        if job["kind"] == "arm":
            known |= {name, job["derived"].get("base", name)}
    check_pairs([*full.compared, *full.yardstick], found, known)
    full.title = cmp.title if cmp.title != "comparison" else str(manifest.get("experiment", sweep_dir.name))
    return report(found, full, out or sweep_dir / "results", missing=missing, labels=labels)


def live_verdicts(sweep_dir: str | Path, cmp: Comparison | None = None) -> pd.DataFrame:
    """Each declared pair's verdict from the rows logged so far (for `sweep.status --verdicts`)."""
    manifest, found, _, _ = sweep_arms(Path(sweep_dir))
    full = _declared(manifest, cmp or Comparison([], experiment_skip=True))
    if not found or not full.compared:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    return compare(found, full).pairs


def _declared(manifest: dict[str, Any], cmp: Comparison) -> Comparison:
    """`cmp` with what the sweep's experiment declares: its pairs (then `cmp`'s extra ones), its
    controls, its yardstick (unless `cmp` names one), its batch ladder and its branch transient."""
    ladder = manifest.get("cbs") or {}  # a batch ladder the experiment declared (the cbs preset)
    full = Comparison(
        [list(p) for p in manifest.get("pairs", [])],
        _spec_for(manifest, cmp),
        cmp.margin,
        cmp.title,
        cmp.ladder or list(ladder.get("ladder", [])),
        cmp.epsilon if cmp.ladder else float(ladder.get("epsilon", cmp.epsilon)),
        cmp.targets or [float(t) for t in ladder.get("targets", [])],
        controls=[list(p) for p in manifest.get("controls", [])],
        yardstick=cmp.yardstick or [list(p) for p in manifest.get("yardstick", [])],
        extra=[*cmp.pairs, *cmp.extra],
        lr_ladders=cmp.lr_ladders or {k: list(v) for k, v in (manifest.get("lr_ladders") or {}).items()},
    )
    if full.ladder and not full.margin.nats:  # the ladder's pairs are judged against epsilon
        full.margin = replace(full.margin, nats=full.epsilon)
    decide = manifest.get("decide") or {}
    if decide:  # the segments and level the arms were stopped by (and their margin, if declared)
        full.spec = replace(full.spec, segments=int(decide["segments"]))
        full.margin = replace(full.margin, alpha=float(decide["alpha"]))
    if decide.get("margin") and not full.margin.nats:
        full.margin = replace(full.margin, nats=float(decide["margin"]))
    return full


def _spec_for(manifest: dict[str, Any], cmp: Comparison) -> BinSpec:
    """`cmp.spec`, skipping the experiment's declared transient where the user gave no skip."""
    if cmp.experiment_skip:
        return replace(cmp.spec, skip_tokens=int(manifest.get("skip_tokens", 0)))
    return cmp.spec
