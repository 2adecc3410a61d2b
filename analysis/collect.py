"""Read what the runs of a sweep wrote into one long DataFrame, on the tokens axis.

Sources are files only (the sweep's `manifest.json` and each run's `metrics.jsonl`); nothing here
imports the trainer. A run that was resumed may have logged a token count twice: the later row
wins, so the merged table has one row per (arm, tokens, kind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["arm", "signature", "batch_size", "kind", "step", "tokens", "loss", "lr", "tokens_per_s"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics file; a torn last line (a killed writer) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def collect_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(long table of every arm's train and validation losses, the manifest)."""
    manifest: dict[str, Any] = json.loads((Path(sweep_dir) / "manifest.json").read_text())
    frames = []
    for name, job in manifest["jobs"].items():
        if job["kind"] != "arm":
            continue
        rows = read_metrics(job["run_dir"])
        if not rows:
            continue
        df = pd.DataFrame(rows)
        train = df[df["loss"].notna()] if "loss" in df else df.iloc[0:0]
        val = df[df["val_loss"].notna()] if "val_loss" in df else df.iloc[0:0]
        parts = [train.assign(kind="train")]
        if len(val):
            parts.append(val.assign(kind="val", loss=val["val_loss"]))
        merged = pd.concat(parts, ignore_index=True)
        merged = merged.drop_duplicates(subset=["kind", "tokens"], keep="last")
        merged = merged.assign(arm=name, signature=job["signature"], batch_size=job["derived"]["batch_size"])
        frames.append(merged.reindex(columns=COLUMNS))
    if not frames:
        return pd.DataFrame(columns=COLUMNS), manifest
    table = pd.concat(frames, ignore_index=True).sort_values(["arm", "kind", "tokens"], ignore_index=True)
    return table, manifest
