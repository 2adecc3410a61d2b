"""Checkpoints: the newest valid one wins; incomplete or corrupt ones are skipped, old ones pruned."""

from __future__ import annotations

import pytest
import torch

from train.checkpoint import checkpoint_dir, load_latest_checkpoint, save_checkpoint


def test_keeps_the_last_k_with_their_markers(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert names == [
        "step-00000003.pt",
        "step-00000003.pt.sha256",
        "step-00000004.pt",
        "step-00000004.pt.sha256",
    ]
    assert load_latest_checkpoint(tmp_path)["step"] == 4


def test_a_checkpoint_without_its_marker_is_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)
    newest = save_checkpoint(tmp_path, 2, {"step": 2}, keep=3)
    newest.with_name(newest.name + ".sha256").unlink()  # the writer died before the marker
    with pytest.warns(UserWarning, match="incomplete"):
        assert load_latest_checkpoint(tmp_path)["step"] == 1


def test_a_corrupt_checkpoint_is_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.zeros(10)}, keep=3)
    newest = save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(10)}, keep=3)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        assert load_latest_checkpoint(tmp_path)["step"] == 1


def test_no_valid_checkpoint_means_a_fresh_start(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, 1, {"step": 1}, keep=1)
    path.write_bytes(b"torn")
    with pytest.warns(UserWarning):
        assert load_latest_checkpoint(tmp_path) is None
