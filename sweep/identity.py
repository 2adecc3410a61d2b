"""A run's identity: the hash of its config minus an explicit exclude list (dora's rule).

Every field of `RunConfig` (and of its `trainer` and `optimizer` nodes, field by field) is either
in `IDENTITY`, with the key it takes in the hashed content, or in `EXCLUDED`, with the reason it
does not change what the run computes. A field in neither is a test failure, so a new option
cannot silently join (renaming every existing run) or silently stay out (two different runs
sharing one run dir). The inputs a run reads are named by the signatures of the jobs that make
them (the prepared data, the warmup it branches from), never by their paths.

The keys are where the first signatures put them, and options added later enter only when they
differ from the behaviour before them, so the signatures of existing arms never change (the
presets' dry runs print the same signatures as before the trainer config was merged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from train.config import ModelConfig, RunConfig

DEFAULT_SPLIT = {"warmup": "warmup", "arm": "experiment"}
AGREEING_LOSS_KERNELS = ("chunked", "fused")


@dataclass(frozen=True)
class Key:
    """Where a config field goes in the hashed content, and when it is there at all."""

    at: str  # dotted path in the content
    when: Callable[[RunConfig], bool] = lambda run: True
    value: Callable[[Any], Any] = lambda v: v


def _branches(run: RunConfig) -> bool:
    return bool(run.init_checkpoint)


# ModelConfig's fields added after the first signatures, with the value that is the behaviour
# before them (a Qwen2 shape): they enter the model's identity only where they differ from it.
MODEL_FIELDS_SINCE = {"arch": "qwen2", "head_dim": 0, "options": {}}


def _model(model: ModelConfig) -> dict[str, Any]:
    """The model's identity: its shape and family; `hf_config` is a path (the config.json's
    content is in the other fields, read at plan time)."""
    out = asdict(model)
    del out["hf_config"]
    return {k: v for k, v in out.items() if k not in MODEL_FIELDS_SINCE or v != MODEL_FIELDS_SINCE[k]}


# Field path in RunConfig -> its place in the identity.
IDENTITY: dict[str, Key] = {
    "stage": Key("kind"),
    "model": Key("model", value=_model),
    "batch_size": Key("batch_size"),
    "token_budget": Key("token_budget"),
    "precision": Key("precision"),
    "lr_warmup_tokens": Key("lr_warmup_tokens"),
    "optimizer.name": Key("optimizer.name", when=lambda run: run.optimizer.name != "adamw"),
    "optimizer.lr": Key("optimizer.lr"),
    "optimizer.beta1": Key("optimizer.beta1"),
    "optimizer.beta2": Key("optimizer.beta2"),
    "optimizer.eps": Key("optimizer.eps"),
    "optimizer.weight_decay": Key("optimizer.weight_decay"),
    "trainer.grad_clip": Key("optimizer.grad_clip"),
    "trainer.seq_len": Key("seq_len"),
    "trainer.data_seed": Key("data_seed"),
    "trainer.val_samples": Key("val_samples"),  # the validation loss is measured on them
    "trainer.carry_optimizer": Key("carry_optimizer"),
    # With a branch point the seeded init is overwritten by its weights: the branch names the start.
    "trainer.init_seed": Key("init", when=lambda run: not _branches(run), value=lambda s: f"seed:{s}"),
    # Invariant Adam's second moment is the mean of squared micro-batch gradients; for Adam (and
    # the per-sequence variants, whose units are sequences) the micro-batch size only changes the
    # order of float sums.
    "trainer.micro_batch_size": Key(
        "micro_batch_size", when=lambda run: run.optimizer.name == "invariant_adam"
    ),
    # chunked and fused agree to float rounding (tests/test_fused_loss.py); any other kernel
    # (Liger's) is checked against them only where it runs (make gpu-check): its runs are its own.
    "trainer.loss_kernel": Key(
        "loss_kernel", when=lambda run: run.trainer.loss_kernel not in AGREEING_LOSS_KERNELS
    ),
    # Per token the per-example optimizers step on other moments; for any other optimizer the unit
    # only changes what the statistics measure (a measurement, as `trainer.per_example_stats`).
    # Per sequence (the behaviour before the option) the key stays out.
    "trainer.per_example_unit": Key(
        "per_example_unit",
        when=lambda run: run.spec.unit == "sequence" and run.trainer.per_example_unit != "sequence",
    ),
    "schedule": Key("schedule", when=lambda run: run.schedule.kind != "constant", value=asdict),
    "split": Key("split", when=lambda run: run.split != DEFAULT_SPLIT.get(run.stage)),
}

EXCLUDED: dict[str, str] = {
    "name": "a label: the same run may be named differently in two sweeps",
    "signature": "the result of this hash",
    "run_dir": "a path (named by the signature)",
    "data_dir": "a path: the data enter by the signature of the prepare job",
    "init_checkpoint": "a path: the branch point enters by the warmup's signature or its content hash",
    "trainer.val_every_tokens": "a logging interval",
    "trainer.checkpoint_every_tokens": "a checkpoint interval (resume is exact)",
    "trainer.keep_checkpoints": "disk housekeeping",
    "trainer.log_every_steps": "a logging interval",
    "trainer.attn_implementation": "a kernel choice: the same attention, other float rounding",
    "trainer.compile": "a kernel choice: the same model, other float rounding",
    "trainer.device": "where it runs: the same run, other float rounding",
    "trainer.fused_adamw": "a kernel choice: the same update, other float rounding",
    "trainer.loss_chunk_tokens": "a memory choice: the same loss, other float rounding",
    "trainer.noise_scale_decay": "smooths a logged measurement (B_simple), not the update",
    "trainer.noise_probe_every": "how often B_simple is measured; the update is unchanged",
    "trainer.peak_flops": "the denominator of the logged MFU",
    "trainer.per_example_stats": "a measurement: the step's gradient is the mean of the per-example "
    "ones (other float rounding)",
    "progress": "a progress bar",
    "sweep_name": "the W&B group, where the run is shown",
    "tags": "W&B tags",
    "wandb": "where metrics are mirrored",
    "extra_config": "shown in W&B, not read by training",
    "launch": "job ids, nodes and restarts of this attempt",
    "stop": "when the arm stops once its pairs are decided: a prefix of the same run",
}

# Nested nodes whose fields are classified one by one; every other field counts as a whole.
SPLIT_NODES = ("trainer", "optimizer")


def content(run: RunConfig, inputs: dict[str, str]) -> dict[str, Any]:
    """The hashed content of `run`: its identity fields where they go, plus the signatures of
    its `inputs` (`data`, and `init` when it branches)."""
    out: dict[str, Any] = {}
    for path, key in IDENTITY.items():
        if not key.when(run):
            continue
        value = run
        for part in path.split("."):
            value = getattr(value, part)
        node = out
        *parents, leaf = key.at.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = key.value(value)
    for name, signature in inputs.items():
        out[name] = signature
    return out


def digest(content: dict[str, Any]) -> str:
    """Short hash of canonical JSON."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_signature(run: RunConfig, data: str, branch: str | None, checkpoint: str | None = None) -> str:
    """The signature of `run` reading the data prepared as `data`, branching from the run `branch`
    (a warmup's signature) or from the weights whose content hash is `checkpoint`
    (experiment.branch_from: a moved directory keeps the signature, changed weights change it)."""
    inputs = {"data": data}
    if branch is not None or checkpoint is not None:
        if not _branches(run):
            raise ValueError(f"run {run.name}: a branch signature without an init_checkpoint")
        inputs["init"] = f"warmup:{branch}" if branch is not None else f"checkpoint:{checkpoint}"
    return digest(content(run, inputs))
