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

import numpy as np
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


def _last_per_token(tokens: np.ndarray) -> np.ndarray:
    """Indices of the last row for each distinct token count, in increasing token order."""
    reverse = tokens[::-1]
    _, first_in_reverse = np.unique(reverse, return_index=True)
    return len(tokens) - 1 - first_in_reverse


def long_table(arms: list[ArmRows]) -> pd.DataFrame:
    """The merged long table, sorted by arm, kind, tokens: train rows (`loss`) and validation rows
    (`val_loss` as `loss`). A later segment re-logs the tokens after its checkpoint, so for each
    token count the last logged row wins. Built column-wise in numpy: 10M rows take about a second."""
    names = sorted({a.arm for a in arms})
    columns: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    states = sorted({a.state for a in arms})
    signatures = sorted({a.signature for a in arms})
    for a in sorted(arms, key=lambda x: x.arm):
        rows = a.rows.reindex(columns=LOGGED)
        values = {c: rows[c].to_numpy(np.float64, na_value=np.nan) for c in LOGGED}
        has_tokens = ~np.isnan(values["tokens"])
        for code, source in enumerate(("loss", "val_loss")):  # kind codes: 0 train, 1 val
            where = np.flatnonzero(has_tokens & ~np.isnan(values[source]))
            keep = where[_last_per_token(values["tokens"][where])]
            n = len(keep)
            columns["arm"].append(np.full(n, names.index(a.arm), np.int32))
            columns["kind"].append(np.full(n, code, np.int8))
            columns["signature"].append(np.full(n, signatures.index(a.signature), np.int32))
            columns["state"].append(np.full(n, states.index(a.state), np.int32))
            columns["batch_size"].append(np.full(n, a.batch_size, np.int64))
            columns["loss"].append(values[source][keep])
            for c in ("step", "tokens", "lr", "b_simple", "tokens_per_s", "gpu_hours"):
                columns[c].append(values[c][keep])
    if not arms:
        return pd.DataFrame(columns=COLUMNS)
    flat = {c: np.concatenate(v) for c, v in columns.items()}
    categories = {"arm": names, "kind": ["train", "val"], "signature": signatures, "state": states}
    table = pd.DataFrame(
        {
            c: pd.Categorical.from_codes(flat[c], categories=categories[c]) if c in categories else flat[c]
            for c in COLUMNS
        }
    )
    table["tokens"] = table["tokens"].astype(np.int64)
    table["batch_size"] = table["batch_size"].astype(np.int64)
    return table


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
