"""Read what the runs of a sweep wrote into one long DataFrame on the tokens axis.

Every source (run dirs here, the W&B API in `analysis.wandb_source`) yields, per arm, its logged
rows in the order they were logged, possibly in several segments (a requeued or resumed run logs
again from its last checkpoint, so tokens repeat). `long_table` turns them into the one schema the
tables read: one row per (arm, kind, tokens), the later row winning, `kind` = train or val.
Nothing here imports the trainer: run files are read through `records/`, which needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from records.metrics import FIELDS, VAL_SEQUENCES, read_metrics
from records.run_status import read_status

COLUMNS = [
    "arm",
    "base",
    "variant",
    "replicate",
    "signature",
    "batch_size",
    "state",
    "kind",
    "step",
    "tokens",
    "loss",
    "lr",
    "b_simple",
    "grad_sq",
    "noise_trace",
    "tokens_per_s",
    "gpu_hours",
]
# The logged keys the analysis reads (records/metrics.py marks them), but the per-sequence list.
LOGGED = [key for key, f in FIELDS.items() if f.read and key != VAL_SEQUENCES]


@dataclass
class ArmRows:
    """One run of an arm as a source found it: identity and its logged rows, oldest first."""

    arm: str  # the job name
    signature: str
    batch_size: int
    state: str
    rows: pd.DataFrame  # columns ⊆ LOGGED; several segments already concatenated in logging order
    base: str = ""  # the arm pairs name (`A` of `A[trainer.data_seed=1]`); "" = `arm`
    variant: str = ""  # other overrides the sweep varies for this job, e.g. "experiment.ratio=16"
    replicate: str = ""  # e.g. "data_seed=1" where the sweep has several data orders
    val_sequences: dict[int, np.ndarray] = field(default_factory=dict)  # tokens -> per-sequence val loss
    branch: str = ""  # the weights it started from (arm table `branch`: `warmup:<signature>`); "" unknown
    branch_tokens: float = math.nan  # tokens its branch point was trained on, where recorded

    @classmethod
    def from_job(
        cls,
        name: str,
        signature: str,
        row: dict[str, Any],
        state: str,
        rows: pd.DataFrame,
        sequences: dict[int, np.ndarray] | None = None,
    ) -> ArmRows:
        """From a job's arm-table row (manifest `derived`, W&B config `arm`) and its logged rows."""
        return cls(
            name,
            signature,
            int(row["batch_size"]),
            state,
            rows.drop(columns=VAL_SEQUENCES, errors="ignore"),
            str(row.get("base") or name),
            str(row.get("variant") or ""),
            str(row.get("replicate") or ""),
            sequences or {},
            str(row.get("branch") or ""),
            float(row.get("branch_tokens") or math.nan),
        )


def val_sequences(rows: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    """Per evaluation (by tokens; the last logged wins) the per-sequence validation losses."""
    return {
        int(r["tokens"]): np.asarray(r[VAL_SEQUENCES], dtype=np.float64) for r in rows if VAL_SEQUENCES in r
    }


def _last_per_token(tokens: np.ndarray) -> np.ndarray:
    """Indices of the last row for each distinct token count, in increasing token order."""
    reverse = tokens[::-1]
    _, first_in_reverse = np.unique(reverse, return_index=True)
    return len(tokens) - 1 - first_in_reverse


def long_table(arms: list[ArmRows]) -> pd.DataFrame:
    """The merged long table, sorted by arm, kind, tokens: train rows (`loss`) and validation rows
    (`val_loss` as `loss`). A later segment re-logs the tokens after its checkpoint, so for each
    token count the last logged row wins.

    Built column-wise in numpy, in two passes (which rows to keep, then one copy of each kept
    value into preallocated columns): 100 runs x 100k rows take a few seconds, most of it the
    memory of the result."""
    if not arms:
        return pd.DataFrame(columns=COLUMNS)
    arms = sorted(arms, key=lambda x: x.arm)
    categories = {
        "arm": sorted({a.arm for a in arms}),
        "base": sorted({a.base or a.arm for a in arms}),
        "variant": sorted({a.variant for a in arms}),
        "replicate": sorted({a.replicate for a in arms}),
        "kind": ["train", "val"],
        "signature": sorted({a.signature for a in arms}),
        "state": sorted({a.state for a in arms}),
    }
    parts = []  # (arm, its logged values, kind code, indices of the rows kept)
    for a in arms:
        rows = a.rows.reindex(columns=LOGGED)
        values = {c: rows[c].to_numpy(np.float64, na_value=np.nan) for c in LOGGED}
        for c in ("grad_sq", "noise_trace"):  # B - 1 degrees of freedom per step instead of one
            exact = values[f"{c}_exact"]
            values[c] = np.where(np.isfinite(exact), exact, values[c])
        has_tokens = ~np.isnan(values["tokens"])
        for code, source in enumerate(("loss", "val_loss")):  # kind codes: 0 train, 1 val
            where = np.flatnonzero(has_tokens & ~np.isnan(values[source]))
            parts.append((a, values, code, where[_last_per_token(values["tokens"][where])]))
    total = sum(len(keep) for *_, keep in parts)
    codes = {"arm": np.int32, "base": np.int32, "variant": np.int32, "replicate": np.int32, "kind": np.int8}
    codes |= {"signature": np.int32, "state": np.int32}
    out = {
        c: np.empty(total, codes.get(c, np.int64 if c in ("tokens", "batch_size") else np.float64))
        for c in COLUMNS
    }
    start = 0
    for a, values, code, keep in parts:
        end = start + len(keep)
        out["arm"][start:end] = categories["arm"].index(a.arm)
        out["base"][start:end] = categories["base"].index(a.base or a.arm)
        out["variant"][start:end] = categories["variant"].index(a.variant)
        out["replicate"][start:end] = categories["replicate"].index(a.replicate)
        out["kind"][start:end] = code
        out["signature"][start:end] = categories["signature"].index(a.signature)
        out["state"][start:end] = categories["state"].index(a.state)
        out["batch_size"][start:end] = a.batch_size
        out["loss"][start:end] = values["val_loss" if code else "loss"][keep]
        for c in ("step", "tokens", "lr", "b_simple", "grad_sq", "noise_trace", "tokens_per_s", "gpu_hours"):
            out[c][start:end] = values[c][keep]
        start = end
    # copy=False keeps one block per column: consolidating 10M-row columns would copy them all again.
    return pd.DataFrame(
        {
            c: pd.Categorical.from_codes(out[c], categories=categories[c]) if c in categories else out[c]
            for c in COLUMNS
        },
        copy=False,
    )


def run_dir_arms(manifest: dict[str, Any]) -> list[ArmRows]:
    """Each arm of a sweep manifest with its `metrics.jsonl` (arms with no rows yet are left out).

    One run may stand under two names. Within one arm and variant (an arm swept alone, later as
    data-order replicate 0 of itself) it counts once, under the name the manifest recorded last;
    across variants (A at experiment.ratio=4 and =16, one run) it stands for each."""

    def key(job: dict[str, Any]) -> tuple[str, str, str]:
        return (job["signature"], job["derived"].get("base", ""), job["derived"].get("variant", ""))

    arms = []
    latest = {key(job): name for name, job in manifest["jobs"].items() if job["kind"] == "arm"}
    for name, job in manifest["jobs"].items():
        if job["kind"] != "arm" or latest[key(job)] != name:
            continue
        rows = read_metrics(job["run_dir"])
        if not rows:
            continue
        state = (read_status(job["run_dir"]) or {}).get("state", "unknown")  # torn or missing: unknown
        arms.append(
            ArmRows.from_job(
                name, job["signature"], job["derived"], state, pd.DataFrame(rows), val_sequences(rows)
            )
        )
    return arms
