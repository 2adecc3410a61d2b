"""Prepared splits and the token stream: one fixed order of samples, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest

from train.config import DataConfig, from_dict
from train.data import TokenStream, load_meta, load_split, prepare


@pytest.fixture(scope="module")
def prepared(prepared_data):
    return from_dict(DataConfig, load_meta(prepared_data)["config"]), prepared_data


def test_prepare_splits_documents_disjointly(prepared):
    cfg, data_dir = prepared
    meta = load_meta(data_dir)
    assert sum(meta["documents"].values()) == 40
    for split in ("warmup", "experiment", "validation"):
        tokens = load_split(data_dir, split)
        assert len(tokens) == meta["tokens"][split] > 0
        # Every document ends with EOS, so EOS counts are document counts.
        assert int((tokens == meta["eos_id"]).sum()) == meta["documents"][split]
    shares = {s: meta["tokens"][s] / sum(meta["tokens"].values()) for s in meta["tokens"]}
    assert shares["experiment"] == pytest.approx(0.65, abs=0.1)


def test_prepare_is_idempotent(prepared):
    cfg, data_dir = prepared
    before = (data_dir / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, progress=False) == data_dir
    assert (data_dir / "meta.json").stat().st_mtime_ns == before


def _stream_tokens(make_stream, batch: int, world: int, micro: int, steps: int, resume_at: int) -> np.ndarray:
    """Sequences in the order a run with this batching consumes them (ranks in order), restarted
    with a fresh stream object at step `resume_at` as a resumed run would be."""
    seen = []
    stream = make_stream()
    for step in range(steps):
        if step == resume_at:
            stream = make_stream()
        for rank in range(world):
            share = stream.rank_slice(step * batch, batch, rank, world)
            seen.extend(share[i : i + micro] for i in range(0, len(share), micro))
    return np.concatenate(seen)


BATCHINGS = [
    (batch, world, micro)
    for batch in (1, 2, 4, 8, 16, 32, 64, 48)  # 48: so that world 3 appears too
    for world in (1, 2, 3, 4)
    if batch % world == 0
    for micro in sorted({1, batch // world, max(1, batch // world // 4)})
]


@pytest.mark.parametrize(("batch", "world", "micro"), BATCHINGS)
def test_same_samples_for_every_batching(prepared, batch, world, micro):
    _, data_dir = prepared
    tokens = load_split(data_dir, "experiment")
    stream = TokenStream(tokens, seq_len=16, seed=3)
    n = 3 * stream.n_windows // 2  # crosses an epoch boundary
    n -= n % 192  # a whole number of steps at every batch size (lcm of 64 and 48)
    steps = n // batch
    expected = stream.samples(0, n)
    got = _stream_tokens(lambda: TokenStream(tokens, 16, 3), batch, world, micro, steps, resume_at=steps // 3)
    assert np.array_equal(got, expected)


def test_epochs_are_permutations_seeded_by_seed(prepared):
    _, data_dir = prepared
    tokens = load_split(data_dir, "experiment")
    stream = TokenStream(tokens, seq_len=16, seed=3)
    first, second = (
        stream.window_ids(0, stream.n_windows),
        stream.window_ids(stream.n_windows, stream.n_windows),
    )
    assert sorted(first) == sorted(second) == list(range(stream.n_windows))
    assert not np.array_equal(first, second)
    assert np.array_equal(TokenStream(tokens, 16, 3).window_ids(0, 50), first[:50])
    assert not np.array_equal(TokenStream(tokens, 16, 4).window_ids(0, 50), first[:50])
