"""Checkpoints: written atomically, the last K kept, the newest readable one found on start.

A checkpoint is one file `<run_dir>/checkpoints/step-<step>.pt`. It is written to a temporary
name, flushed to disk, then renamed, so a file under the final name is always whole; a file
that still fails to load (disk trouble, a foreign file) is skipped with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    tmp = folder / f".step-{step:08d}.pt.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in _checkpoints(folder)[max(keep, 1) :]:
        old.unlink(missing_ok=True)
    return final


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint of `run_dir` that loads, or None; unreadable ones are skipped."""
    for path in _checkpoints(checkpoint_dir(run_dir)):
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn or foreign file must not stop the run
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
            continue
        return state
    return None
