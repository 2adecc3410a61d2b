"""Checkpoints: written atomically, verified on load, the last K kept, the newest valid one found on start.

A checkpoint is `<run_dir>/checkpoints/step-<step>.pt` plus its completion marker
`step-<step>.pt.sha256` holding the file's SHA-256. The data file is written to a temporary
name, flushed and renamed; the marker is written (the same way) only after that. On load, a
checkpoint without its marker (the writer died in between) or whose bytes no longer match it
(disk trouble, a torn copy) is skipped with a warning and the next newest is tried.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")
MARKER = ".sha256"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk: free what the partial file took, so that the failure can still be recorded.
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    _write_atomic(final, lambda f: torch.save(state, f))
    digest = _sha256(final)
    _write_atomic(final.with_name(final.name + MARKER), lambda f: f.write(digest.encode()))
    for old in _checkpoints(folder)[max(keep, 1) :]:
        old.with_name(old.name + MARKER).unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return final


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the half-written temporary files a killed writer left (a checkpoint's can be GBs).

    Call only with the run dir's claim held: then no live process is writing any of them."""
    run_dir = Path(run_dir)
    stale = [*checkpoint_dir(run_dir).glob(".*.tmp-*"), *run_dir.glob(".*.tmp-*")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest valid checkpoint of `run_dir`, or None; incomplete or corrupt ones are skipped."""
    for path in _checkpoints(checkpoint_dir(run_dir)):
        marker = path.with_name(path.name + MARKER)
        try:
            expected = marker.read_text().strip()
        except FileNotFoundError:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {marker.name})", stacklevel=2)
            continue
        if _sha256(path) != expected:
            warnings.warn(f"skipping corrupt checkpoint {path} (checksum mismatch)", stacklevel=2)
            continue
        try:
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a foreign file that happens to match its marker must not stop the run
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
            continue
        return state
    return None
