"""`<run dir>/metrics.jsonl`: one JSON object per logged row, every row carrying `tokens`.

`FIELDS` is the schema: every key a row may hold, its unit, what it means and whether the analysis
reads it. The trainer writes rows (train/loop.py, train/per_example.py; a test checks every key
it logs is here), the analysis reads the keys marked `read` (analysis/collect.py takes its columns
from this table), and docs/metrics.md is `markdown_table()` (a test checks it). Adding a statistic
is an entry here, its producer and its consumer. `python -m records.metrics` prints the table.

The file is the source of truth for a run's history: W&B mirrors it (rank 0 only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
# Per-sequence validation losses (mean nats per token of each validation sequence, in order): in
# metrics.jsonl for the paired analysis, not in W&B (a list per row is not a metric it can plot).
VAL_SEQUENCES = "val_sequence_loss"


@dataclass(frozen=True)
class Field:
    unit: str
    meaning: str
    read: bool = False  # the analysis reads it


# The per-example statistics' parameter groups (train/per_example.py forms them).
GROUPS = ("embeddings", "attention", "mlp", "norms", "head")

FIELDS: dict[str, Field] = {
    "step": Field("steps", "optimizer steps so far", True),
    "tokens": Field("tokens", "tokens consumed: compare arms on this", True),
    "loss": Field(
        "nats/token",
        "mean next-token loss over every token of the global batch (as one big batch, whatever the "
        "ranks and micro-batches)",
        True,
    ),
    "lr": Field("", "the step's learning rate", True),
    "beta1": Field("", "Adam's beta1 of the step", False),
    "beta2": Field("", "Adam's beta2 of the step", False),
    "batch_size": Field("sequences", "the step's global batch (a Seesaw ramp changes it)", False),
    "grad_norm": Field("", "global gradient norm before clipping", False),
    "clip_fraction": Field(
        "", "share of steps so far where clipping fired (trainer.grad_clip, default 1e9: off)", False
    ),
    "b_simple": Field(
        "sequences",
        "gradient noise scale B_simple (McCandlish et al. 2018, App. A), smoothed over its "
        "measurements (trainer.noise_scale_decay); x seq_len for tokens",
        True,
    ),
    "grad_sq": Field(
        "", "this step's unbiased |G|^2, on the steps that measured it (the analysis sums it)", True
    ),
    "noise_trace": Field(
        "per sequence", "this step's unbiased tr(Sigma), on the steps that measured it", True
    ),
    "tokens_per_s": Field("tokens/s", "throughput over the last few seconds", True),
    "mfu": Field(
        "", "model FLOPs utilisation: FLOPs/token x tokens/s / (peak x devices); absent on CPU", False
    ),
    "peak_mem_gb": Field("GB", "peak allocated GPU memory (max RSS on CPU)", False),
    "gpu_hours": Field("device-hours", "wall time x devices so far, over every restart", True),
    "loss_scale": Field("", "fp16 only: the gradient scaler's scale", False),
    "pe_norm_mean": Field("", "per-example statistics: mean of the per-sequence gradient norms |g_i|", False),
    "pe_norm_std": Field("", "per-example statistics: spread of the per-sequence gradient norms", False),
    "b_simple_exact": Field(
        "sequences", "B_simple = tr(Sigma)/|G|^2 from every sequence's gradient (unbiased)", False
    ),
    "grad_sq_exact": Field(
        "", "|G|^2 from every sequence's gradient: preferred by the analysis where logged", True
    ),
    "noise_trace_exact": Field(
        "per sequence", "tr(Sigma) from every sequence's gradient: preferred where logged", True
    ),
    **{
        f"snr_{group}": Field(
            "per sequence", f"per-example signal-to-noise ratio |G_k|^2/tr(Sigma_k) of the {group}", False
        )
        for group in GROUPS
    },
    # trainer.per_example_unit=token: the same statistics over token positions, under their own keys
    "pe_norm_mean_token": Field("", "per-token statistics: mean of the per-position gradient norms", False),
    "pe_norm_std_token": Field("", "per-token statistics: spread of the per-position gradient norms", False),
    "b_simple_token": Field("tokens", "B_simple from every position's gradient contribution", False),
    "grad_sq_token": Field("", "|G|^2 from every position's gradient contribution", False),
    "noise_trace_token": Field("per token", "tr(Sigma) over positions' gradient contributions", False),
    **{
        f"snr_{group}_token": Field("per token", f"per-token signal-to-noise ratio of the {group}", False)
        for group in GROUPS
    },
    "val_loss": Field(
        "nats/token",
        "loss on the fixed validation slice (trainer.val_samples sequences, the same for every arm)",
        True,
    ),
    VAL_SEQUENCES: Field(
        "nats/token", "each validation sequence's loss, in order (metrics.jsonl only, not W&B)", True
    ),
}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics file; a torn last line (a killed writer) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop rows logged after `last_step` (a resumed run logs them again from its checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row torn by a kill
            continue
        if row.get("step", -1) <= last_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def markdown_table() -> str:
    """The metrics reference of docs/metrics.md."""
    lines = ["| key | unit | meaning | read by the analysis |", "|---|---|---|---|"]
    for key, f in FIELDS.items():
        lines.append(
            f"| `{key}` | {f.unit} | {f.meaning.replace('|', chr(92) + '|')} | {'yes' if f.read else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
