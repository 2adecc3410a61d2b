"""The three figures of a comparison, sized and labelled for a paper (units on every axis)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(binned: pd.DataFrame, path: Path, title: str) -> None:
    """Loss vs tokens, every arm, bin means with +-SE bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    for arm, df in binned.groupby("arm"):
        mid = (df["bin_start"] + df["bin_end"]) / 2
        ax.plot(mid, df["mean"], marker="o", ms=3, label=str(arm))
        se = df["se"].fillna(0.0)
        ax.fill_between(mid, df["mean"] - se, df["mean"] + se, alpha=0.25)
    ax.set_xlabel("tokens consumed since branching")
    ax.set_ylabel("training loss (nats/token), bin mean ± SE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="arm")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def equivalence(gaps: pd.DataFrame, path: Path, title: str) -> None:
    """Per pair: the gap per bin with SE bars, zero, and the +-delta equivalence band."""
    plt = _pyplot()
    pairs = list(dict.fromkeys(gaps["pair"]))
    cols = min(2, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), dpi=150, squeeze=False)
    for ax, pair in zip(axes.flat, pairs, strict=False):
        df = gaps[gaps["pair"] == pair]
        mid = (df["bin_start"] + df["bin_end"]) / 2
        delta = float(df["delta"].iloc[0])
        if np.isfinite(delta):
            ax.axhspan(-delta, delta, color="tab:green", alpha=0.15, label=f"±δ = {delta:.3g} nats")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.errorbar(mid, df["gap"], yerr=df["gap_se"].fillna(0.0), fmt="o", ms=3, capsize=2, label="gap ± SE")
        a, b = pair.split("-", 1)
        ax.set_title(f"{pair}: loss({a}) − loss({b})")
        ax.set_xlabel("tokens consumed since branching")
        ax.set_ylabel("loss gap (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def noise(arms: pd.DataFrame, path: Path, title: str) -> None:
    """Per-step loss noise vs batch (log-log) and the 1/sqrt(batch) line of the noise-dominated regime."""
    plt = _pyplot()
    df = arms[np.isfinite(arms["loss_std"]) & (arms["loss_std"] > 0)]
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=150)
    for row in df.itertuples():
        ax.scatter(row.batch_size, row.loss_std, s=30, zorder=3)
        ax.annotate(str(row.arm), (row.batch_size, row.loss_std), textcoords="offset points", xytext=(5, 4))
    if len(df):
        # The line through the geometric mean of the points: std = c / sqrt(batch).
        c = float(np.exp(np.mean(np.log(df["loss_std"]) + 0.5 * np.log(df["batch_size"]))))
        b = np.geomspace(df["batch_size"].min() / 1.5, df["batch_size"].max() * 1.5, 50)
        ax.plot(b, c / np.sqrt(b), ls="--", color="gray", label="∝ 1/√batch")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("per-step training-loss noise (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
