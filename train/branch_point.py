"""`experiment.branch_from`: the researcher's own weights as the branch point of every arm, in
place of the throwaway warmup. Torch-free: the planner reads it on a login node.

A branch point is either
- a `save_pretrained` directory: a config.json with `model.safetensors`, or shards with their
  `model.safetensors.index.json`; or
- a run directory this project wrote (a finished warmup or arm): its final checkpoint, which
  also holds Adam's moments (`trainer.carry_optimizer`).

Its identity is its *content*: the SHA-256 of the weight files (name and bytes, in name order),
computed once and cached beside them keyed by each file's size and mtime, so a moved or copied
directory keeps the arms' signatures and a changed checkpoint changes them. A run directory's
final checkpoint carries its digest already (train/checkpoint.py writes it with the file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from records.run_status import CHECKPOINT_DIR, CHECKPOINT_MARKER, STATUS_FILE, RunState
from train.families import HfShape, read_hf_config

CACHE_FILE = ".bss-content.json"  # the content hash, beside the weight files
INDEX_FILE = "model.safetensors.index.json"
# The shape's fields a checkpoint must match, in the order a mismatch is reported.
SHAPE_FIELDS = (
    "arch",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class BranchPoint:
    path: str  # absolute
    kind: str  # pretrained | run
    content: str  # the hash of the weights
    tokens: float  # tokens the checkpoint was trained on, where it records them; nan otherwise
    shape: HfShape | None  # pretrained: its config.json read as a shape
    has_optimizer: bool


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` directory: those its index names, or the
    single `model.safetensors`. Raises ValueError naming what is missing."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from exc
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are not there: {', '.join(missing)}")
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{directory}: no model.safetensors or {INDEX_FILE} (save it with save_pretrained)")


def content_hash(files: list[Path], cache: Path) -> str:
    """SHA-256 of the files' names and bytes, cached in `cache` while their sizes and mtimes stay."""
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    value = digest.hexdigest()
    try:  # written atomically; a read-only directory just hashes again next time
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stamp, "sha256": value}))
        tmp.replace(cache)
    except OSError:
        pass
    return value


def _tokens_of_pretrained(directory: Path) -> float:
    """Tokens trained, where the directory says: Hugging Face Trainer's `trainer_state.json`
    (`num_input_tokens_seen`)."""
    try:
        seen = json.loads((directory / "trainer_state.json").read_text()).get("num_input_tokens_seen")
        return float(seen) if seen else math.nan
    except (OSError, ValueError, AttributeError):
        return math.nan


def is_project_run(directory: str | Path) -> bool:
    """A run directory of this project (its status file), not a save_pretrained one."""
    return (Path(directory) / STATUS_FILE).is_file()


def read_branch_point(path: str) -> BranchPoint:
    """The branch point at `path`; ValueError with a one-line message naming it where it is not one."""
    where = f"experiment.branch_from={path!r}"
    directory = Path(path).expanduser().absolute()
    if not directory.is_dir():
        raise ValueError(f"{where}: not a directory")
    status_file = directory / STATUS_FILE
    if is_project_run(directory):
        status = json.loads(status_file.read_text())
        if status.get("state") != RunState.COMPLETED:
            raise ValueError(f"{where}: a run of this project that has not completed ({status.get('state')})")
        final = sorted((directory / CHECKPOINT_DIR).glob(f"step-*.pt{CHECKPOINT_MARKER}"))
        if not final:
            raise ValueError(f"{where}: a completed run without a complete checkpoint")
        return BranchPoint(
            str(directory),
            "run",
            final[-1].read_text().strip(),
            float(status.get("tokens", math.nan)),
            None,
            True,
        )
    try:
        shape = read_hf_config(str(directory))
        files = weight_files(directory)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}".replace(f"model.hf_config={str(directory)!r}: ", "")) from exc
    content = content_hash(files, directory / CACHE_FILE)
    return BranchPoint(str(directory), "pretrained", content, _tokens_of_pretrained(directory), shape, False)


def shape_problem(point: BranchPoint, model: dict[str, object]) -> str:
    """The first shape field in which `model` (ModelConfig's fields) differs from the
    checkpoint's config.json ("" if none)."""
    if point.shape is None:
        return ""
    theirs = {"arch": point.shape.arch, "head_dim": 0, **point.shape.fields}
    for name in SHAPE_FIELDS:
        if name in theirs and theirs[name] != model[name]:
            return (
                f"experiment.branch_from={point.path!r}: its config.json has {name}={theirs[name]!r}, "
                f"the model {name}={model[name]!r} (give model.hf_config={point.path})"
            )
    return ""
