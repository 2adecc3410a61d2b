"""Write a sweep's comparison: `results/pairs.csv`, `pairs.md`, `bins.csv` and `curves.png`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collect import collect_sweep
from analysis.tables import BinSpec, bin_arms, pair_table

PAIR_COLUMNS = ["pair", "batch_a", "batch_b", "bins", "mean_gap", "gap_se", "t", "same_sign", "max_abs_gap"]
PAIR_COLUMNS += ["op_spread", "gap_over_spread"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def to_markdown(df: pd.DataFrame, columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df[columns].itertuples(index=False)]
    return "\n".join(lines)


def plot_curves(binned: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for arm, df in binned.groupby("arm"):
        mid = (df["bin_start"] + df["bin_end"]) / 2
        ax.plot(mid, df["mean"], marker="o", ms=3, label=str(arm))
        ax.fill_between(mid, df["mean"] - df["se"], df["mean"] + df["se"], alpha=0.25)
    ax.set_xlabel("tokens consumed since branching")
    ax.set_ylabel("training loss (nats/token), bin mean ± SE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="arm")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def analyze(sweep_dir: str | Path, spec: BinSpec | None = None, pairs: list[list[str]] | None = None) -> Path:
    """Compare the declared pairs (and `pairs`) of a sweep; print `pairs.md` and the written paths."""
    spec = spec or BinSpec()
    sweep_dir = Path(sweep_dir)
    runs, manifest = collect_sweep(sweep_dir)
    pairs = [list(p) for p in manifest.get("pairs", [])] + [list(p) for p in pairs or []]
    arms = sorted(set(runs["arm"]))
    missing = sorted({a for p in pairs for a in p} - set(arms))
    out = sweep_dir / "results"
    out.mkdir(exist_ok=True)
    usable = [p for p in pairs if not set(p) & set(missing)]
    table = pair_table(runs, usable, spec) if usable else pd.DataFrame(columns=PAIR_COLUMNS)
    binned = bin_arms(runs, arms, spec) if arms else pd.DataFrame()
    table.to_csv(out / "pairs.csv", index=False)
    binned.to_csv(out / "bins.csv", index=False)
    header = f"# {manifest.get('experiment', sweep_dir.name)}: pairwise loss gap vs tokens\n\n"
    n_bins = binned["bin"].nunique() if len(binned) else 0
    notes = [
        f"Training loss binned on tokens ({n_bins} bins). mean_gap = a - b averaged over the pair's common "
        "bins (nats); gap_se its standard error over bins; "
        "same_sign = share of bins with the sign of the mean; "
        "op_spread = mean |gap| between operating points at equal batch size; gap_over_spread << 1 means "
        "the rule maps one batch size onto the other.",
    ]
    if missing:
        notes.append(f"No metrics yet for arm(s) {', '.join(missing)}: their pairs are left out.")
    text = header + to_markdown(table, PAIR_COLUMNS) + "\n\n" + "\n\n".join(notes) + "\n"
    (out / "pairs.md").write_text(text)
    if len(binned):
        plot_curves(binned, out / "curves.png", f"{manifest.get('experiment', '')}: loss vs tokens")
    print(text)
    for name in ("pairs.md", "pairs.csv", "bins.csv", "curves.png"):
        if (out / name).exists():
            print(f"wrote {out / name}")
    return out
