"""Read what the runs of a sweep wrote into one long DataFrame on the tokens axis.

Every source (run dirs here, the W&B API in `analysis.wandb_source`) yields, per arm, its logged
rows in the order they were logged, possibly in several segments (a requeued or resumed run logs
again from its last checkpoint, so tokens repeat). `long_table` turns them into the one schema the
tables read: one row per (arm, kind, tokens), the later row winning, `kind` = train or val.
Nothing here imports the trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = [
    "arm",
    "signature",
    "batch_size",
    "state",
    "kind",
    "step",
    "tokens",
    "loss",
    "lr",
    "b_simple",
    "tokens_per_s",
    "gpu_hours",
]
LOGGED = ["step", "tokens", "loss", "val_loss", "lr", "b_simple", "tokens_per_s", "gpu_hours"]


@dataclass
class ArmRows:
    """One arm as a source found it: identity and its logged rows, oldest first."""

    arm: str
    signature: str
    batch_size: int
    state: str
    rows: pd.DataFrame  # columns ⊆ LOGGED; several segments already concatenated in logging order


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


def long_table(arms: list[ArmRows]) -> pd.DataFrame:
    """The merged long table: train rows (`loss`) and validation rows (`val_loss` as `loss`)."""
    frames = []
    for a in arms:
        rows = a.rows.reindex(columns=LOGGED)
        rows = rows[rows["tokens"].notna()]
        train = rows[rows["loss"].notna()].assign(kind="train")
        val = rows[rows["val_loss"].notna()].assign(kind="val", loss=lambda d: d["val_loss"])
        both = pd.concat([train, val], ignore_index=True)
        # A later segment re-logs the tokens after its checkpoint: the last row for a token count wins.
        both = both.drop_duplicates(subset=["kind", "tokens"], keep="last")
        both = both.assign(arm=a.arm, signature=a.signature, batch_size=a.batch_size, state=a.state)
        frames.append(both.reindex(columns=COLUMNS))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    table["tokens"] = table["tokens"].astype("int64")
    return table.sort_values(["arm", "kind", "tokens"], ignore_index=True)


def run_dir_arms(manifest: dict[str, Any]) -> list[ArmRows]:
    """Each arm of a sweep manifest with its `metrics.jsonl` (arms with no rows yet are left out)."""
    arms = []
    for name, job in manifest["jobs"].items():
        if job["kind"] != "arm":
            continue
        rows = read_metrics(job["run_dir"])
        if not rows:
            continue
        status_path = Path(job["run_dir"]) / "status.json"
        state = (
            json.loads(status_path.read_text()).get("state", "unknown") if status_path.exists() else "unknown"
        )
        batch = int(job["derived"]["batch_size"])
        arms.append(ArmRows(name, job["signature"], batch, state, pd.DataFrame(rows)))
    return arms


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{sweep_dir} holds no manifest.json: run the sweep first, or set sweep.dir=PATH"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest
