"""The trainer for real: 2-process gloo DDP parity, SIGKILL + resume, stop signals, divergence,
fp16, logged metrics, W&B failures. Tiny model, tiny data, a few seconds each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness import (
    REPO,
    finish,
    rows,
    run_world,
    start,
    status,
    stop_after,
    tiny_run,
    trace,
    wait_for_rows,
)
from tests.wandb_standin import offline_history, synced
from train.checkpoint import load_latest_checkpoint
from train.config import OptimizerConfig, WandbConfig

# ----------------------------------------------------------------------------- DDP parity


@pytest.mark.slow
def test_two_rank_ddp_with_accumulation_matches_one_rank_with_the_whole_batch(prepared_data, tmp_path):
    budget = 8 * 32 * 5
    one = tiny_run(prepared_data, tmp_path / "one", token_budget=budget)
    two = tiny_run(
        prepared_data, tmp_path / "two", token_budget=budget, micro_batch_size=2
    )  # 2 ranks x 2 micro
    run_world(one, 1, tmp_path / "g1.pt")
    run_world(two, 2, tmp_path / "g2.pt")
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    for name, grad in g1.items():
        # fp32 sums in another order: relative differences of a few 1e-7 at most.
        assert (g2[name] - grad).norm() <= 1e-6 * grad.norm(), name
    losses = [[r["loss"] for r in rows(Path(c.run_dir))] for c in (one, two)]
    assert len(losses[0]) == 5
    # No step of either rank read anything back to the host (tests/test_step_syncs.py's counter).
    for rank in (0, 1):
        assert json.loads((tmp_path / f"g2-reads-{rank}.json").read_text()) == {"steps": 4}
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    # Each rank evaluates its share of the validation sequences; rank 0 logs all of them, in order.
    sequences = [[r["val_sequence_loss"] for r in rows(Path(c.run_dir), "val_loss")] for c in (one, two)]
    assert len(sequences[0][0]) == 32
    assert np.array(sequences[1]) == pytest.approx(np.array(sequences[0]), abs=1e-5)


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def reference(prepared_data, tmp_path_factory):
    """An uninterrupted run with accumulation (so B_simple is estimated) and frequent checkpoints."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cfg = tiny_run(
        prepared_data,
        run_dir,
        micro_batch_size=4,
        token_budget=8 * 32 * 24,
        checkpoint_every_tokens=8 * 32 * 3,
        val_every_tokens=8 * 32 * 4,
        optimizer=OptimizerConfig(lr=3e-3),
        grad_clip=1.0,
    )
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    return cfg, trace(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 8, 17])
def test_sigkill_at_any_step_then_resume_logs_the_identical_run(reference, tmp_path, kill_after):
    cfg, expected = reference
    cfg = replace(cfg, run_dir=str(tmp_path / "run"), wandb=WandbConfig(mode="offline"))
    proc = start(cfg, WANDB_MODE="offline")
    wait_for_rows(tmp_path / "run", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(rows(tmp_path / "run"))
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    got = trace(tmp_path / "run")
    assert got == expected, f"killed after step {killed_at}"  # bit-identical, nothing missing or repeated
    # One W&B run across the restart: the resumed attempt's offline dir holds the whole history,
    # one row per optimizer step; the first attempt's dir is kept aside, never synced with it.
    current = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    kept = list((tmp_path / "run" / "wandb" / "superseded").glob("offline-run-*/run-*.wandb"))
    assert len(current) == len(kept) == 1 and current[0].name == f"run-{cfg.signature}.wandb"
    history = offline_history(current[0])
    assert [h["_step"] for h in history] == list(range(25))
    assert [(h["_step"], h["loss"]) for h in history if "loss" in h] == [t[:2] for t in expected[:24]]


@pytest.mark.slow
def test_stop_signal_checkpoints_at_a_step_boundary_and_resumes_exactly(reference, tmp_path):
    cfg, expected = reference
    cfg = replace(cfg, run_dir=str(tmp_path / "run"))
    stop_after(cfg, 5)
    stopped = status(tmp_path / "run")
    assert stopped["state"] == "stopped"
    assert (
        load_latest_checkpoint(tmp_path / "run")["step"] == stopped["step"]
    )  # the stop step, not an older one
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    assert trace(tmp_path / "run") == expected


@pytest.mark.slow
def test_resume_is_exact_with_noise_probes(prepared_data, tmp_path):
    """One batch size per step (no accumulation): B_simple comes from probes every 3 steps. A run
    stopped between probes and resumed logs the uninterrupted run's rows, probes included."""
    cfg = tiny_run(
        prepared_data,
        tmp_path / "ref",
        token_budget=8 * 32 * 16,
        noise_probe_every=3,
        checkpoint_every_tokens=8 * 32 * 4,
    )
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    probed = [r for r in rows(tmp_path / "ref") if "grad_sq" in r]
    assert [r["step"] for r in probed] == [3, 6, 9, 12, 15]  # not the last step: nothing after it to probe

    def probe_trace(run_dir: Path) -> list[tuple]:
        return trace(run_dir) + [
            (r["step"], r["grad_sq"], r["noise_trace"]) for r in rows(run_dir, "grad_sq")
        ]

    again = replace(cfg, run_dir=str(tmp_path / "run"))
    stop_after(again, 7)
    code, err = finish(start(again))
    assert code == 0, err[-3000:]
    assert probe_trace(tmp_path / "run") == probe_trace(tmp_path / "ref")


def test_checkpoint_holds_everything_resume_needs(reference):
    cfg, _ = reference
    state = load_latest_checkpoint(cfg.run_dir)
    assert state["final"] and state["step"] == 24 and state["tokens"] == 24 * 8 * 32
    assert state["samples"] == 24 * 8 and state["wandb_id"] == cfg.signature
    assert {"model", "optimizer", "scaler", "noise_scale", "counters", "rng", "lr"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    assert state["counters"]["device_seconds"] > 0


# ----------------------------------------------------------------------------- what is logged


def test_every_step_logs_the_study_metrics(reference):
    cfg, _ = reference
    train_rows = rows(Path(cfg.run_dir))
    assert [r["step"] for r in train_rows] == list(range(1, 25))
    last = train_rows[-1]
    for key in ("tokens", "loss", "lr", "beta1", "beta2", "batch_size", "grad_norm", "clip_fraction"):
        assert key in last
    for key in ("b_simple", "tokens_per_s", "peak_mem_gb", "gpu_hours"):
        assert last[key] > 0
    assert "mfu" not in last  # no known peak FLOP/s on a CPU
    assert [r["tokens"] for r in rows(Path(cfg.run_dir), "val_loss")] == [
        0,
        1024,
        2048,
        3072,
        4096,
        5120,
        6144,
    ]
    # clip 1.0 fires on some steps: the fraction is the running share of clipped steps.
    clipped = [r["grad_norm"] > 1.0 for r in train_rows]
    assert last["clip_fraction"] == pytest.approx(sum(clipped) / len(clipped))
    assert train_rows[-1]["gpu_hours"] > train_rows[0]["gpu_hours"]


def test_mfu_is_logged_against_a_given_peak(prepared_data, tmp_path):
    cfg = tiny_run(prepared_data, tmp_path / "run", token_budget=8 * 32 * 3, peak_flops=1e11)
    from train.loop import train

    train(cfg)
    row = rows(tmp_path / "run")[-1]
    flops = cfg.model.flops_per_token(cfg.trainer.seq_len)
    assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / 1e11)


def test_every_logged_key_is_in_the_metrics_schema_and_every_entry_is_logged(prepared_data, tmp_path):
    """records/metrics.py's FIELDS is what the trainer writes: every key of every row of an fp16 run
    with a known peak (loss_scale, mfu), runs with per-example statistics per sequence and per token
    and one with accumulation (the noise scale) is in it, and every entry is written by one of them
    (snr_head and snr_head_token need an untied LM head, which the tiny model has not)."""
    from records.metrics import FIELDS
    from train.loop import train

    budget = 8 * 32 * 2
    runs = [
        tiny_run(prepared_data, tmp_path / "fp16", token_budget=budget, precision="fp16", peak_flops=1e11),
        tiny_run(prepared_data, tmp_path / "pe", token_budget=budget, per_example_stats=True),
        tiny_run(
            prepared_data,
            tmp_path / "tok",
            token_budget=budget,
            per_example_stats=True,
            per_example_unit="token",
        ),
        # accumulation (micro-batches of 4 of 8) measures the noise scale at every step
        tiny_run(prepared_data, tmp_path / "plain", token_budget=budget, micro_batch_size=4),
    ]
    logged: set[str] = set()
    for cfg in runs:
        train(cfg)
        logged |= {key for row in rows(Path(cfg.run_dir), "step") for key in row}
    assert logged - set(FIELDS) == set()
    assert set(FIELDS) - logged == {"snr_head", "snr_head_token"}


# ----------------------------------------------------------------------------- guards


def test_nan_loss_stops_the_arm_as_diverged_keeping_its_last_good_checkpoint(prepared_data, tmp_path):
    from train.loop import Diverged, train

    cfg = tiny_run(
        prepared_data,
        tmp_path / "run",
        token_budget=8 * 32 * 30,
        checkpoint_every_tokens=8 * 32,
        optimizer=OptimizerConfig(lr=1e36),  # weights of 1e36 overflow fp32 activations
    )
    with pytest.raises(Diverged):
        train(cfg)
    st = status(tmp_path / "run")
    assert st["state"] == "diverged" and re.search(r"loss (nan|inf) at step \d+", st["error"])
    bad_step = int(st["error"].rsplit(" ", 1)[1])
    # Checkpoints were written every step up to the last finite one, none at or after the bad step.
    kept = load_latest_checkpoint(tmp_path / "run")
    assert kept is not None and kept["step"] == bad_step - 1
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_unchanging_validation_loss_fails_loudly(prepared_data, tmp_path):
    from train.loop import BadValidation, train

    # An lr of 1e-30 moves no fp32 weight (a zero lr is refused before the run starts).
    cfg = tiny_run(
        prepared_data, tmp_path / "run", val_every_tokens=8 * 32 * 2, optimizer=OptimizerConfig(lr=1e-30)
    )
    with pytest.raises(BadValidation, match="unchanged"):
        train(cfg)
    assert status(tmp_path / "run")["state"] == "failed"


def test_fp16_with_gradient_scaler_tracks_fp32(prepared_data, tmp_path):
    from train.loop import train

    runs = {
        p: tiny_run(prepared_data, tmp_path / p, precision=p, token_budget=8 * 32 * 6)
        for p in ("fp32", "fp16")
    }
    for cfg in runs.values():
        train(cfg)
    fp32, fp16 = (rows(Path(c.run_dir)) for c in runs.values())
    assert all(r["loss_scale"] > 1 for r in fp16)
    # fp16 activations carry ~3 significant digits: losses near 5.7 agree to a few 1e-3.
    assert [r["loss"] for r in fp16] == pytest.approx([r["loss"] for r in fp32], abs=2e-2)


def test_arm_can_carry_the_branch_points_optimizer_state(prepared_data, tmp_path):
    from train.loop import train

    warm = tiny_run(
        prepared_data, tmp_path / "warmup", stage="warmup", split="warmup", token_budget=8 * 32 * 2
    )
    train(warm)
    arms = {
        carry: tiny_run(
            prepared_data, tmp_path / f"arm{carry}", init_checkpoint=warm.run_dir, carry_optimizer=carry
        )
        for carry in (False, True)
    }
    first = {}
    for carry, cfg in arms.items():
        train(cfg)
        first[carry] = rows(Path(cfg.run_dir))[1]["loss"]
        assert (
            rows(Path(cfg.run_dir), "val_loss")[0]["val_loss"]
            == rows(tmp_path / "warmup", "val_loss")[-1]["val_loss"]
        )
    assert first[True] != first[False]  # same weights, same data: only the Adam moments differ


def test_wandb_service_killed_mid_run_is_a_warning_not_a_failure(prepared_data, tmp_path):
    cfg = tiny_run(
        prepared_data, tmp_path / "run", token_budget=8 * 32 * 60, wandb=WandbConfig(mode="offline")
    )
    proc = start(cfg, WANDB_MODE="offline")
    wait_for_rows(tmp_path / "run", 3, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no W&B service process found"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert status(tmp_path / "run")["state"] == "completed"
    assert [r["step"] for r in rows(tmp_path / "run")] == list(range(1, 61))
    assert "W&B" in err


def test_a_resumed_offline_run_syncs_as_one_continuous_wandb_run(prepared_data, tmp_path):
    """A run stopped (SLURM's warning) and resumed, offline: `wandb sync` of its run dir's offline
    run sends every step once, in order, with the logged values (to the protocol stand-in, which
    keeps history lines by offset as the server does)."""
    cfg = tiny_run(
        prepared_data,
        tmp_path / "run",
        token_budget=8 * 32 * 12,
        checkpoint_every_tokens=8 * 32 * 4,
        val_every_tokens=8 * 32 * 6,
        wandb=WandbConfig(mode="offline"),
    )
    stop_after(cfg, 6)
    code, err = finish(start(cfg))
    assert code == 0, err[-3000:]
    logged = rows(tmp_path / "run")
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run = synced(offline)[cfg.signature]
    history, placement = list(run.rows), run.config["distributed"]
    assert placement == {"world": 1, "hosts": 1, "backend": None, "reason": ""}  # as status.json has it
    assert [h["_step"] for h in history] == list(range(13))
    assert [(h["step"], h["tokens"], h["loss"]) for h in history[1:]] == [
        (r["step"], r["tokens"], r["loss"]) for r in logged
    ]
    assert [h["step"] for h in history if "val_loss" in h] == [
        r["step"] for r in rows(tmp_path / "run", "val_loss")
    ]


def test_a_corrupt_final_warmup_checkpoint_says_how_to_recover(prepared_data, tmp_path):
    from train.loop import train

    warm = tiny_run(
        prepared_data, tmp_path / "sweep" / "runs" / "warmup-x", name="warmup", stage="warmup", split="warmup"
    )
    train(warm)
    final = sorted((Path(warm.run_dir) / "checkpoints").glob("step-*.pt"))[-1]
    final.write_bytes(final.read_bytes()[:-100] + b"\0" * 100)  # disk trouble: the checksum no longer matches
    arm = tiny_run(prepared_data, tmp_path / "sweep" / "runs" / "A-y", init_checkpoint=warm.run_dir)
    with pytest.raises(FileNotFoundError, match="completed, but its final checkpoint is missing or corrupt"):
        train(arm)
    assert (
        f"python -m sweep.resubmit {tmp_path / 'sweep'} --arms warmup" in status(Path(arm.run_dir))["error"]
    )


# ----------------------------------------------------------------------------- threads


def test_the_thread_count_never_changes_a_result(prepared_data, tmp_path):
    """The embedded model's shape (64 wide, 4 heads, 2 KV heads) trained as a job with 1 and with 2
    intra-op threads: every logged loss, gradient norm and validation loss is bit-identical, so the
    launcher may give a job whatever CPUs are free (the thread count is not part of a run's identity)."""
    from train.config import ModelConfig

    model = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2)
    traces = {}
    for threads in (1, 2):
        cfg = tiny_run(prepared_data, tmp_path / f"run{threads}", model=model, token_budget=8 * 32 * 8)
        path = tmp_path / f"run{threads}.json"
        path.write_text(json.dumps(asdict(cfg)))
        script = (
            "import json, sys; from sweep.stage import StageJob;"
            "from train.config import RunConfig, from_dict;"
            "run = from_dict(RunConfig, json.load(open(sys.argv[1])));"
            "StageJob('train', run=run, threads=int(sys.argv[2]))()"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(path), str(threads)], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert status(tmp_path / f"run{threads}")["launch"]["threads"] == threads
        traces[threads] = trace(tmp_path / f"run{threads}")
    assert traces[1] == traces[2]


@pytest.mark.parametrize(
    ("env", "affinity", "threads"),
    [
        ({}, 2, 2),  # a job alone here: every CPU it may run on
        ({"LOCAL_WORLD_SIZE": "2"}, 2, 1),  # two ranks of one job share them
        ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),  # never fewer than one
        ({"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "8"}, 64, 8),  # SLURM says per task
        ({"SLURM_CPUS_PER_TASK": "8"}, 4, 4),  # but not more than the task may run on
    ],
)
def test_a_job_takes_the_threads_of_the_cpus_it_was_given(env, affinity, threads):
    from slurm.environment import job_threads

    assert job_threads(env, affinity) == threads


def test_the_local_launcher_shares_the_free_cpus_among_the_jobs_ready():
    from sweep.local_backend import cpu_share

    assert cpu_share(free=2, ready=1, slots=2, tasks=1) == 2  # the warmup alone: both cores
    assert cpu_share(free=2, ready=5, slots=2, tasks=1) == 1  # five arms: two at a time, one each
    assert cpu_share(free=1, ready=4, slots=1, tasks=1) == 1
    assert cpu_share(free=2, ready=5, slots=1, tasks=1) == 2  # max_parallel=1: one job, every core
    assert cpu_share(free=16, ready=3, slots=16, tasks=2) == 5  # a 2-rank job: 5 CPUs, 2 threads a rank
    assert cpu_share(free=1, ready=1, slots=1, tasks=2) == 2  # at least a CPU per rank
