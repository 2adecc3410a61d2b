"""Step decay and the Seesaw ramp: the batch/lr trajectory, token continuity across batch changes
in the trainer, and a run killed mid-ramp resuming exactly."""

from __future__ import annotations

import math
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.harness import finish, rows, start, tiny_run, trace, wait_for_rows
from train.checkpoint import load_latest_checkpoint
from train.data import TokenStream
from train.loop import train
from train.schedule import ScheduleConfig, ScheduleError, halvings, layout

SEQ = 32


def test_step_decay_halves_lr_and_seesaw_doubles_batch_instead():
    budget = 4 * SEQ * 16  # 16 steps of batch 4; halvings at 1/2 and 3/4 of the tokens
    decay = layout(ScheduleConfig("step_decay", [0.5, 0.75]), 4, SEQ, budget)
    assert list(decay.batch) == [4] * 16
    assert list(decay.lr_factor) == [1.0] * 8 + [0.5] * 4 + [0.25] * 4
    seesaw = layout(ScheduleConfig("seesaw", [0.5, 0.75]), 4, SEQ, budget)
    # Batch 4 to 1024 tokens (8 steps), 8 to 1536 (2 steps), 16 to 2048 (1 step): 11 serial steps.
    assert list(seesaw.batch) == [4] * 8 + [8] * 2 + [16]
    assert seesaw.lr_factor == pytest.approx([1.0] * 8 + [2**-0.5] * 2 + [0.5])
    assert list(seesaw.phase) == [0] * 8 + [1] * 2 + [2]
    # Each Seesaw phase: lr^2 x batch stays that of phase 0 (lr / sqrt(2) per batch doubling).
    for phase in range(3):
        assert seesaw.lr_factor[seesaw.phase == phase][0] ** 2 * 2**phase == pytest.approx(1.0)
    # Contiguous samples: each step starts where the previous ended; the last ends on the budget.
    assert list(seesaw.offset[1:]) == list(np.cumsum(seesaw.batch)[:-1])
    assert seesaw.tokens_after(seesaw.steps - 1) == budget == decay.tokens_after(decay.steps - 1)


def test_cosine_is_approximated_by_halvings_where_it_crosses_powers_of_two():
    cuts = halvings(ScheduleConfig("step_decay", cosine_halvings=3), 1000)
    # (1 + cos(pi t / T)) / 2 = 2^-k  at  t = T acos(2^(1-k) - 1) / pi
    assert cuts == pytest.approx([500.0, 1000 * math.acos(-0.5) / math.pi, 1000 * math.acos(-0.75) / math.pi])


def test_a_schedule_that_does_not_end_on_the_budget_is_refused():
    with pytest.raises(ScheduleError, match="does not end on the token budget"):
        layout(ScheduleConfig("seesaw", [0.3]), 4, SEQ, 4 * SEQ * 10)
    with pytest.raises(ScheduleError, match="fractions of the budget"):
        layout(ScheduleConfig("step_decay", [1.5]), 4, SEQ, 4 * SEQ * 10)
    with pytest.raises(ScheduleError, match="expected one of"):
        layout(ScheduleConfig("triangle"), 4, SEQ, 4 * SEQ * 10)


def test_the_trainer_reads_every_sample_once_across_batch_changes(prepared_data, tmp_path, monkeypatch):
    read: list[tuple[int, int]] = []
    original = TokenStream.rank_slice

    def recording(self, offset, batch_size, rank, world_size):
        read.append((offset, batch_size))
        return original(self, offset, batch_size, rank, world_size)

    monkeypatch.setattr(TokenStream, "rank_slice", recording)
    budget = 4 * SEQ * 16
    cfg = tiny_run(
        prepared_data, tmp_path / "run", batch_size=4, token_budget=budget, micro_batch_size=2,
        schedule=ScheduleConfig("seesaw", [0.5, 0.75]),
    )  # fmt: skip
    train(cfg)
    assert [b for _, b in read] == [4] * 8 + [8] * 2 + [16]
    assert [o for o, _ in read] == [0, *np.cumsum([b for _, b in read])[:-1]]  # no gap, no repeat
    logged = rows(tmp_path / "run")
    assert [r["batch_size"] for r in logged] == [4] * 8 + [8] * 2 + [16]
    assert [r["tokens"] for r in logged] == list(np.cumsum([b * SEQ for _, b in read]))
    assert [r["lr"] for r in logged][7:] == pytest.approx([3e-3, 3e-3 / 2**0.5, 3e-3 / 2**0.5, 1.5e-3])
    assert all(r["tokens_per_s"] > 0 for r in logged)


@pytest.mark.slow
def test_a_run_killed_mid_ramp_resumes_exactly(prepared_data, tmp_path_factory):
    budget = 4 * SEQ * 32  # batch 4 for 16 steps, 8 for 4 steps (to 3/4), then 16 for 2 steps
    cfg = tiny_run(
        prepared_data, tmp_path_factory.mktemp("ref") / "run", batch_size=4, token_budget=budget,
        checkpoint_every_tokens=4 * SEQ * 2, val_every_tokens=4 * SEQ * 8,
        schedule=ScheduleConfig("seesaw", [0.5, 0.75]),
    )  # fmt: skip
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    expected = trace(Path(cfg.run_dir))
    assert len(rows(Path(cfg.run_dir))) == 22

    killed = replace(cfg, run_dir=str(tmp_path_factory.mktemp("killed") / "run"))
    proc = start(killed)
    wait_for_rows(Path(killed.run_dir), 18, proc)  # inside the batch-8 phase
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = load_latest_checkpoint(killed.run_dir)
    assert checkpoint is not None and checkpoint["phase"] >= 1  # the ramp position was saved
    assert checkpoint["samples"] == checkpoint["tokens"] // SEQ
    code, err = finish(start(killed))
    assert code == 0, err[-3000:]
    assert trace(Path(killed.run_dir)) == expected
