"""Checkpoints: written atomically, verified on load, the last K kept, the newest valid one found on start.

A checkpoint is `<run_dir>/checkpoints/step-<step>.pt` plus its completion marker
`step-<step>.pt.sha256` holding the file's SHA-256. The data file is written to a temporary
name, hashed as its bytes are written (a 6 GB state at 0.5B is not read back), flushed and
renamed; the marker is written (the same way) only after that. On load, a checkpoint without its
marker (the writer died in between) or whose bytes no longer match it (disk trouble, a torn copy)
is skipped with a warning and the next newest is tried.

The checksum is verified while the file is read (a second thread). In a DDP run only rank 0
verifies (`find_checkpoint`); the other ranks read the file it chose without hashing it again
(`load_trusted`), each reading meanwhile the one it expects.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from records.run_status import CHECKPOINT_DIR, CHECKPOINT_MARKER

_NAME = re.compile(r"^step-(\d{8})\.pt$")
MARKER = CHECKPOINT_MARKER


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


class _Hashing:
    """A binary file that hashes what is written to it (torch.save writes sequentially), each
    large block hashed on a second thread while it is being written: both release the GIL, so the
    hash costs no time beside the write. A block is only valid during its `write` call (torch.save
    copies GPU tensors to temporary host buffers), so each call waits for its own hash."""

    BLOCK = 1 << 20  # smaller writes (headers, small tensors) are hashed inline

    def __init__(self, file: Any, pool: ThreadPoolExecutor) -> None:
        self.file, self.pool, self.digest = file, pool, hashlib.sha256()

    def write(self, data: Any) -> int:
        if len(data) < self.BLOCK:
            self.digest.update(data)
            return int(self.file.write(data))
        hashed = self.pool.submit(self.digest.update, data)
        try:
            return int(self.file.write(data))
        finally:
            hashed.result()

    def flush(self) -> None:
        self.file.flush()


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
    hashing: list[_Hashing] = []

    def write(f: Any) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as pool:
            hashing.append(_Hashing(f, pool))
            torch.save(state, hashing[-1])  # type: ignore[arg-type]  # a writable binary stream

    _write_atomic(final, write)
    digest = hashing[-1].digest.hexdigest()
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
    found = find_checkpoint(run_dir)
    return None if found is None else found[1]


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint of `run_dir` (its path and contents), or None; incomplete or
    corrupt ones are skipped with a warning."""
    for path in _checkpoints(checkpoint_dir(run_dir)):
        marker = path.with_name(path.name + MARKER)
        try:
            expected = marker.read_text().strip()
        except FileNotFoundError:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {marker.name})", stacklevel=2)
            continue
        # Hashed on a second thread while it is read (both release the GIL), used only if it matches.
        with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as pool:
            digest = pool.submit(_sha256, path)
            try:
                state, unreadable = load_trusted(path), None
            except Exception as exc:  # a foreign file that happens to match its marker must not stop the run
                state, unreadable = {}, exc
            matches = digest.result() == expected
        if not matches:
            warnings.warn(f"skipping corrupt checkpoint {path} (checksum mismatch)", stacklevel=2)
            continue
        if unreadable is not None:
            warnings.warn(f"skipping unreadable checkpoint {path}: {unreadable}", stacklevel=2)
            continue
        return path, state
    return None


def newest_complete(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that has its completion marker, unverified: what rank 0's
    `find_checkpoint` will most likely choose."""
    for path in _checkpoints(checkpoint_dir(run_dir)):
        if path.with_name(path.name + MARKER).exists():
            return path
    return None


def load_trusted(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, without verifying its checksum (another rank did)."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state
