"""Pairing on real runs: two tiny-model arms at batch 16 and 1 with the same hyperparameters, fed
the same samples, and what the trainer logs for the paired validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.paired import LoggedSteps, matched_windows, successive_noise
from records.metrics import VAL_SEQUENCES
from tests.harness import prepare_texts, tiny_run
from train.loop import train


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus whose sequences differ a lot in difficulty, like real text: half the documents
    repeat one line (easy), half are random words (hard). Which sequences a batch holds then
    moves its loss far more than the training does from one step to the next."""
    import random

    root = tmp_path_factory.mktemp("mixed")
    rng = random.Random(1)
    words = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "blood"]
    for i in range(60):
        if i % 2:
            text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(150))
        else:
            text = "\n".join(["the king and the queen of the night"] * 150)
        (root / f"doc{i:02d}.txt").write_text(text)
    return prepare_texts(root, (0.45, 0.05, 0.5), tmp_path_factory.mktemp("mixed-cache"))


@pytest.mark.slow
def test_the_paired_gap_of_real_arms_is_far_less_noisy_than_the_unpaired_one(mixed_data, tmp_path):
    # From a short warmup, as a study branches: a model fresh from init finds every sequence
    # equally hard, and there is no shared sample noise to cancel yet.
    warmup = tiny_run(
        mixed_data, tmp_path / "warmup", stage="warmup", split="warmup", token_budget=16 * 32 * 24
    )
    train(warmup)
    budget = 16 * 32 * 32  # 32 steps of batch 16, 512 of batch 1
    runs = {}
    for batch in (16, 1):
        cfg = tiny_run(
            mixed_data,
            tmp_path / f"b{batch}",
            batch_size=batch,
            token_budget=budget,
            init_checkpoint=warmup.run_dir,
        )
        train(cfg)
        rows = [r for r in _logged(tmp_path / f"b{batch}") if "loss" in r]
        runs[batch] = LoggedSteps.of(
            np.array([r["step"] for r in rows]),
            np.array([r["tokens"] for r in rows]),
            np.array([r["loss"] for r in rows]),
        )
    w = matched_windows(runs[16], runs[1])
    assert len(w) == 32 and np.all(np.diff(w.end) == 16 * 32)
    # The batch-16 arm's step k and the mean of the batch-1 arm's 16 steps over the same samples.
    assert w.b[0] == pytest.approx(np.mean(runs[1].loss[:16]), rel=1e-12)
    # Per-window noise (successive differences: blind to the curves' steep early trend), paired and not.
    paired = successive_noise(w.gap)
    unpaired = math.sqrt(successive_noise(w.a) ** 2 + successive_noise(w.b) ** 2)
    assert paired < unpaired / 2, (paired, unpaired)  # measured: 0.077 against 0.307 (x4.0)


def test_evaluations_log_every_sequence_loss(prepared_data, tmp_path):
    cfg = tiny_run(
        prepared_data, tmp_path / "run", token_budget=8 * 32 * 4, val_every_tokens=8 * 32 * 2, val_samples=6
    )
    train(cfg)
    evaluations = [r for r in _logged(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    for r in evaluations:
        assert len(r[VAL_SEQUENCES]) == 6
        # val_loss is the mean over the sequences (float32 sums: a few 1e-7 relative)
        assert np.mean(r[VAL_SEQUENCES]) == pytest.approx(r["val_loss"], rel=1e-6)
