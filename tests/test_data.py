"""Prepared splits and the token stream: one fixed order of samples, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest

from train.config import DataConfig, SplitConfig, TokenizerConfig
from train.data import TokenStream, load_meta, load_split, prepare


@pytest.fixture(scope="module")
def prepared(text_corpus, tmp_path_factory):
    cfg = DataConfig(
        source="text_files",
        path=str(text_corpus),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=300),
        splits=SplitConfig(warmup=0.25, validation=0.1, experiment=0.65),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return cfg, prepare(cfg, progress=False)


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


def _stream_tokens(stream: TokenStream, batch: int, world: int, micro: int, steps: int) -> np.ndarray:
    """Sequences in the order a run with this batching consumes them (ranks in order)."""
    seen = []
    for step in range(steps):
        for rank in range(world):
            share = stream.rank_batch(step, batch, rank, world)
            seen.extend(share[i : i + micro] for i in range(0, len(share), micro))
    return np.concatenate(seen)


@pytest.mark.parametrize(
    ("batch", "world", "micro"), [(1, 1, 1), (2, 2, 1), (4, 1, 2), (8, 4, 1), (16, 2, 4), (64, 4, 8)]
)
def test_same_samples_for_every_batching(prepared, batch, world, micro):
    _, data_dir = prepared
    stream = TokenStream(load_split(data_dir, "experiment"), seq_len=16, seed=3)
    n = 3 * stream.n_windows // 2  # crosses an epoch boundary
    n -= n % 64
    expected = stream.samples(0, n)
    assert np.array_equal(_stream_tokens(stream, batch, world, micro, n // batch), expected)


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
