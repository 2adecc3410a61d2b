"""Pairing on real runs: two tiny-model arms at batch 16 and 1 with the same hyperparameters, fed
the same samples, and what the trainer logs for the paired validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.paired import Steps, matched_windows
from analysis.robust import robust_mean
from tests.conftest import tiny_run
from train.loop import train
from train.runlog import VAL_SEQUENCES


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_paired_gap_of_real_arms_is_far_less_noisy_than_the_unpaired_one(prepared_data, tmp_path):
    budget = 16 * 32 * 40  # 40 steps of batch 16, 640 of batch 1
    runs = {}
    for batch in (16, 1):
        cfg = tiny_run(prepared_data, tmp_path / f"b{batch}", batch_size=batch, token_budget=budget)
        train(cfg)
        rows = [r for r in _logged(tmp_path / f"b{batch}") if "loss" in r]
        runs[batch] = Steps.of(
            np.array([r["step"] for r in rows]),
            np.array([r["tokens"] for r in rows]),
            np.array([r["loss"] for r in rows]),
        )
    w = matched_windows(runs[16], runs[1])
    assert len(w) == 40 and np.all(np.diff(w.end) == 16 * 32)
    # The batch-16 arm's step k and the mean of the batch-1 arm's 16 steps over the same samples.
    assert w.b[0] == pytest.approx(np.mean(runs[1].loss[:16]), rel=1e-12)
    paired = robust_mean(w.gap).se
    unpaired = math.sqrt(robust_mean(w.a).se ** 2 + robust_mean(w.b).se ** 2)
    assert paired < unpaired / 2, (paired, unpaired)


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
