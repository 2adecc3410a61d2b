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


def test_a_checkpoint_is_hashed_while_written_not_read_back(tmp_path, monkeypatch):
    """At 0.5B the state is ~6 GB: its checksum comes from the bytes as they are written."""
    import hashlib

    import train.checkpoint as checkpoint

    def read_back(path):  # type: ignore[no-untyped-def]
        raise AssertionError(f"{path} read back to hash it")

    monkeypatch.setattr(checkpoint, "_sha256", read_back)
    state = {"big": torch.randn(1 << 19), "small": torch.arange(7), "step": 3}  # 2 MB: hashed on the thread
    path = save_checkpoint(tmp_path, 3, state, keep=1)
    marker = path.with_name(path.name + ".sha256").read_text()
    assert marker == hashlib.sha256(path.read_bytes()).hexdigest()


def shared_checkpoint_worker(rank: int, port: int, run_dir: str, out: str) -> None:
    """One of two ranks loading the run's newest valid checkpoint, counting the files it hashes."""
    import json
    import os

    import train.checkpoint as checkpoint
    from train.distributed import init_distributed
    from train.loop import shared_checkpoint

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    hashed: list[str] = []
    sha256 = checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed.append(path.name) or sha256(path)  # type: ignore[func-returns-value]
    where = init_distributed("cpu")
    state = shared_checkpoint(run_dir, where)
    assert where.watch is not None
    where.watch.close()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"step": state and state["step"], "hashed": hashed}, f)


def test_in_ddp_only_rank_0_verifies_and_every_rank_loads_its_choice(tmp_path):
    """The newest checkpoint is corrupt: rank 0 finds out and chooses the older one; rank 1, which
    read the newest meanwhile without hashing it, loads rank 0's choice instead."""
    import json

    import torch.multiprocessing as mp

    from tests.harness import free_port

    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, {"step": 1, "w": torch.zeros(1000)}, keep=3)
    newest = save_checkpoint(run_dir, 2, {"step": 2, "w": torch.zeros(1000)}, keep=3)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the tensor's bytes: still loadable, the checksum tells
    newest.write_bytes(bytes(data))
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [
        ctx.Process(target=shared_checkpoint_worker, args=(r, port, str(run_dir), str(tmp_path)))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [1, 1]
    assert ranks[0]["hashed"] == ["step-00000002.pt", "step-00000001.pt"]
    assert ranks[1]["hashed"] == []
