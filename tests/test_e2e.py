"""The whole embedded study through the real CLI: Hydra, submitit's local executor, DDP-free
trainer, W&B offline, analysis. A tiny token budget keeps it to about 1½ minutes on 2 idle cores
(85 s in CI; several times that under load)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from records.manifest import read_manifest
from tests.harness import REPO, TINY, sweep_status

pytestmark = pytest.mark.e2e


MATRIX = ["A", "H", "I", "G", "B", "M", "D", "J", "K05", "K2", "L"]  # the seed study's arms, in sweep order


def _sweep(root: Path, *extra: str, experiment: str = "sqrt_rule") -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        f"+experiment={experiment}",
        "-m",
        f"sweep.root={root}",
        *TINY,
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    out = _sweep(root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "sqrt_rule", out


def test_every_arm_completes_with_metrics_and_wandb_files(sweep_run):
    sweep_dir, _ = sweep_run
    manifest = read_manifest(sweep_dir)
    arms = {n: j for n, j in manifest["jobs"].items() if j["kind"] == "arm"}
    # Every job ran with one thread (the local default: it survives a busy machine), the arms side by side.
    jobs = {n: j for n, j in manifest["jobs"].items() if j["kind"] != "prepare"}
    threads = {
        n: json.loads((Path(j["run_dir"]) / "status.json").read_text())["launch"]["threads"]
        for n, j in jobs.items()
    }
    assert set(threads.values()) == {1}
    spans = sorted(
        (s["started"], s["finished"])
        for s in (json.loads((Path(j["run_dir"]) / "status.json").read_text()) for j in arms.values())
    )
    overlapping = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    assert overlapping or len(os.sched_getaffinity(0)) == 1
    assert sorted(arms) == sorted(MATRIX)
    for name, job in arms.items():
        run_dir = Path(job["run_dir"])
        assert run_dir.name == f"{name}-{job['signature']}"
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        assert [r["tokens"] for r in train] == sorted({r["tokens"] for r in train})
        assert train[-1]["tokens"] == 16384 and all(math.isfinite(r["loss"]) for r in train)
        assert [r["tokens"] for r in rows if "val_loss" in r] == [0, 8192, 16384]
        offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert offline and offline[0].name == f"run-{job['signature']}.wandb"  # W&B id = signature
        assert list((run_dir / "checkpoints").glob("step-*.pt"))


def test_all_arms_branch_from_the_same_warmup_weights(sweep_run):
    sweep_dir, _ = sweep_run
    manifest = read_manifest(sweep_dir)
    first_val = {}
    for name, job in manifest["jobs"].items():
        rows = (
            [json.loads(line) for line in (Path(job["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            if job["kind"] != "prepare"
            else []
        )
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        if vals:
            first_val[name] = vals[0] if job["kind"] == "arm" else vals[-1]
    # Every arm's loss before its first step is the warmup's final loss: same weights, same slice.
    # Batched evaluation at different micro-batch sizes may differ in the last float bits only.
    for arm in MATRIX:
        # L evaluates under fp16 autocast: the same weights, measured to fp16's precision.
        assert first_val[arm] == pytest.approx(first_val["warmup"], rel=1e-2 if arm == "L" else 1e-5)


def test_results_tables_hold_finite_numbers(sweep_run):
    sweep_dir, out = sweep_run
    pairs = pd.read_csv(sweep_dir / "results" / "pairs.csv")
    assert list(pairs["pair"]) == ["A-H", "A-H", "J-B", "J-B", "A-D", "A-D"]
    assert list(pairs["metric"]) == ["train", "val"] * 3
    train = pairs[pairs["metric"] == "train"]
    assert train[["mean_gap", "gap_se", "reach", "op_spread", "delta"]].map(math.isfinite).all().all()
    assert (train["from_tokens"] >= 4096).all()  # the experiment's skip, recorded in the manifest
    # Every arm measured its noise scale: each pair's regime sits beside its verdict.
    assert train[["b_over_noise_a", "b_over_noise_b"]].map(math.isfinite).all().all()
    assert set(train["regime_a"]) | set(train["regime_b"]) <= {
        "noise-dominated",
        "near B_noise",
        "beyond B_noise",
    }
    # Every evaluation is paired sequence by sequence: validation gaps have their exact SE.
    assert pairs[pairs["metric"] == "val"]["gap_se"].map(math.isfinite).all()
    for plot in ("curves.png", "equivalence.png", "pairing.png", "regime.png"):
        assert (sweep_dir / "results" / plot).stat().st_size > 10_000
    md = (sweep_dir / "results" / "pairs.md").read_text()
    assert "| A-H |" in md and md.split("\n")[0] in out.stdout  # the demo ends by printing it
    assert str(sweep_dir / "results" / "curves.png") in out.stdout


def test_rerunning_the_sweep_launches_nothing(sweep_run):
    sweep_dir, _ = sweep_run
    jobs_before = sorted(p.name for p in (sweep_dir / "jobs").iterdir())
    out = _sweep(sweep_dir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nothing to run" in out.stdout
    assert sorted(p.name for p in (sweep_dir / "jobs").iterdir()) == jobs_before


def test_single_arm_mode_uses_the_same_run_dir(sweep_run):
    sweep_dir, _ = sweep_run
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "+experiment=sqrt_rule",
        "arm=H",
        f"sweep.root={sweep_dir.parent}",
        *TINY,
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = read_manifest(sweep_dir)
    assert f"H: already completed ({manifest['jobs']['H']['run_dir']})" in out.stdout


def test_analysis_cli_reads_the_sweep(sweep_run):
    sweep_dir, _ = sweep_run
    cmd = [
        sys.executable,
        "-m",
        "analysis",
        "+experiment=sqrt_rule",
        f"sweep.root={sweep_dir.parent}",
        "analysis.bins=4",
        "analysis.pairs=[[A,B]]",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| A-B |" in out.stdout
    pairs = pd.read_csv(sweep_dir / "results" / "pairs.csv")
    assert list(pairs["pair"]) == ["A-H", "A-H", "J-B", "J-B", "A-D", "A-D", "A-B", "A-B"]
    assert list(pairs["metric"]) == ["train", "val"] * 4
    assert "A-H (train): " in out.stdout  # a verdict in words


def test_status_lists_every_job_completed(sweep_run):
    sweep_dir, _ = sweep_run
    code, states = sweep_status(sweep_dir)
    assert code == 0
    assert states == dict.fromkeys(["prepare", "warmup", *MATRIX], "completed")


def test_status_fits_a_terminal_and_tails_a_log(sweep_run):
    sweep_dir, _ = sweep_run
    cmd = [sys.executable, "-m", "sweep.status", "sqrt_rule", "--root", str(sweep_dir.parent)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and max(len(line) for line in out.stdout.splitlines()) <= 100, out.stdout
    assert out.stdout.splitlines()[-1].startswith("13 jobs: 13 completed")
    # Each arm's last validation loss (the sequences every arm shares), not one step's training loss.
    for arm in ("A", "D"):
        rows = (Path(read_manifest(sweep_dir)["jobs"][arm]["run_dir"]) / "metrics.jsonl").read_text()
        last = [json.loads(line)["val_loss"] for line in rows.splitlines() if '"val_loss"' in line][-1]
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"{arm} "))
        assert f" {last:.4f} " in line, line
    tail = subprocess.run([*cmd, "--tail", "H", "--lines", "5"], cwd=REPO, capture_output=True, text=True)
    assert tail.returncode == 0 and tail.stdout.startswith("==> ") and "_log.err <==" in tail.stdout


def test_status_shows_live_verdicts(sweep_run):
    sweep_dir, _ = sweep_run
    cmd = [sys.executable, "-m", "sweep.status", "sqrt_rule", "--root", str(sweep_dir.parent), "--verdicts"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "verdicts so far" in out.stdout and "| A-H | train |" in out.stdout and "| J-B | val |" in out.stdout
    )


def test_a_budget_the_data_cannot_hold_is_refused_and_a_changed_arm_gets_a_new_run_dir(sweep_run):
    """Runs last: it changes H. A budget its split cannot hold is refused before anything runs (the
    data is prepared: the planner checks what the trainer would); another lr is another run."""
    sweep_dir, _ = sweep_run
    old_h = read_manifest(sweep_dir)["jobs"]["H"]
    refused = _sweep(sweep_dir.parent, "experiment.arms.H.token_budget=16777216")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (
        "arm H: the run reads 131072 sequences of 129 tokens but split 'experiment' holds" in refused.stderr
    )
    assert read_manifest(sweep_dir)["jobs"]["H"] == old_h  # nothing recorded
    out = _sweep(sweep_dir.parent, "experiment.arms.H.lr_scale=2")
    assert out.returncode == 0, out.stderr[-3000:]
    others = ", ".join(a for a in MATRIX if a != "H")
    assert f"already completed, skipped: prepare, warmup, {others}" in out.stdout
    new_h = read_manifest(sweep_dir)["jobs"]["H"]
    assert new_h["signature"] != old_h["signature"] and new_h["run_dir"] != old_h["run_dir"]
    assert new_h["previous"][-1]["signature"] == old_h["signature"]
    assert Path(old_h["run_dir"], "status.json").exists()  # the old run is kept
    code, states = sweep_status(sweep_dir)
    assert code == 0 and states["H"] == "completed"


def test_a_rerun_whose_config_redoes_the_warmup_is_refused_for_one_arm(sweep_run):
    """A alone with another base lr (which the warmup uses too) would branch from a new warmup
    while H, D, J stay on the old one: refused before anything runs or is recorded."""
    sweep_dir, _ = sweep_run
    before = (sweep_dir / "manifest.json").read_text()
    out = _sweep(sweep_dir.parent, "arm=A", "ops.base.lr=0.004")
    assert out.returncode == 1 and "arms compared in a pair must start from the same weights" in out.stderr
    assert "but H (pair A-H) started from warmup:" in out.stderr and "Traceback" not in out.stderr
    assert (sweep_dir / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    ("experiment", "arms"),
    [
        ("invariant_adam", ["S16", "S4", "S1", "V16", "V4", "V1"]),
        ("seesaw", ["SD", "SS", "C"]),
        ("linear_vs_sqrt", ["A", "H", "C", "CB", "B", "J"]),
        ("weight_decay", ["A", "H", "T", "B", "J"]),
        ("per_example_adam", ["A", "M", "V", "Q", "M_half", "M_x2"]),  # one lr ladder whole
        ("sign_placement", ["E16", "S16", "M16", "E4", "S4", "M4"]),
    ],
)
def test_every_preset_runs_on_the_embedded_default(sweep_run, tmp_path, experiment, arms):
    # The sqrt_rule run above covers prepare and warmup: reuse its tokenized data, branch from a seed.
    data = f"data.cache_dir={sweep_run[0].parent / 'data'}"
    out = _sweep(
        tmp_path, data, "experiment.warmup.enabled=false", f"arm={','.join(arms)}", experiment=experiment
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / experiment
    code, states = sweep_status(sweep_dir)
    assert code == 0 and states == dict.fromkeys(["prepare", *arms], "completed")
    manifest = read_manifest(sweep_dir)
    pairs = pd.read_csv(sweep_dir / "results" / "pairs.csv")
    assert list(pairs[pairs["metric"] == "train"]["pair"]) == ["-".join(p) for p in manifest["pairs"]]
    logged = {
        arm: [
            json.loads(x)
            for x in (Path(manifest["jobs"][arm]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        for arm in arms
    }
    train = {arm: [r for r in rows if "loss" in r] for arm, rows in logged.items()}
    assert {arm: rows[-1]["tokens"] for arm, rows in train.items()} == dict.fromkeys(
        arms, 16384
    )  # matched budgets
    if experiment == "seesaw":  # same tokens in fewer serial steps: batch 4 -> 8 -> 16 at 1/2 and 3/4
        assert len(train["SD"]) == 32 and len(train["SS"]) == 22
        assert [r["batch_size"] for r in train["SS"]][15:18] == [4, 8, 8]
        assert train["SD"][-1]["lr"] == pytest.approx(train["SD"][0]["lr"] / 4)
        assert train["SS"][-1]["lr"] == pytest.approx(train["SS"][0]["lr"] / 2)
    if experiment == "invariant_adam":
        assert manifest["jobs"]["V1"]["derived"]["micro_batch_size"] == 1
        assert "invariant_adam" in out.stdout  # the arm table shows the optimizer
    if experiment == "per_example_adam":  # the variants log per-example statistics, Adam does not
        assert all("b_simple_exact" in r and "snr_mlp" in r for arm in "MVQ" for r in train[arm])
        assert "pe_norm_mean" not in train["A"][0]
        ranked = pd.read_csv(sweep_dir / "results" / "ranking.csv")
        assert sorted(ranked["arm"]) == sorted(arms) and ranked["final_val_loss"].is_monotonic_increasing
        assert set(ranked.dropna(subset=["vs"])["vs"]) == {"A"}
        ladders = pd.read_csv(sweep_dir / "results" / "ladders.csv").set_index("ladder")
        assert ladders.loc["micro_adam", "rungs"] == 3 and ladders.loc["adamw", "rungs"] == 1
        final = ranked.drop_duplicates("arm").set_index("arm")["final_val_loss"]
        best_m = min(["M_half", "M", "M_x2"], key=final.__getitem__)
        assert ladders.loc["micro_adam", "best_arm"] == best_m
        assert ladders["final_val_loss"].is_monotonic_increasing and "lr ladders" in out.stdout
    if experiment == "sign_placement":
        assert "sign_example" in out.stdout and "sign_ema" in out.stdout
        assert "pe_norm_mean" in train["E4"][0] and "pe_norm_mean" not in train["S4"][0]
    if experiment == "weight_decay":  # tau kept in tokens by T, shrunk 4-fold by H (sqrt(16))
        derived = {arm: manifest["jobs"][arm]["derived"] for arm in arms}
        assert derived["T"]["wd"] == pytest.approx(derived["A"]["wd"] / 4)
        assert derived["H"]["wd"] == derived["A"]["wd"]
        assert "tau" in out.stdout and "819k" in out.stdout and "205k" in out.stdout


def test_cbs_preset_branches_a_ladder_from_two_points_and_reports_the_critical_batch(sweep_run, tmp_path):
    """The cbs preset with two branch points (warmups of 8192 and 16384 tokens, the first a prefix of
    the second): the ladder's first three rungs K1, K2, K4 from each (three points are what the
    fit needs; fewer jobs keep the suite short), then cbs.csv (one row per branch point) and
    cbs_fit.csv with finite numbers, and both figures."""
    data = f"data.cache_dir={sweep_run[0].parent / 'data'}"
    out = _sweep(
        tmp_path,
        data,
        "trainer.noise_probe_every=8",
        "arm=K1,K2,K4",
        "experiment.warmup.token_budget=8192,16384",
        experiment="cbs",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "cbs"
    code, states = sweep_status(sweep_dir)
    warmups = [f"warmup[experiment.warmup.token_budget={n}]" for n in (8192, 16384)]
    assert code == 0 and len(states) == 1 + 2 + 6 and set(states.values()) == {"completed"}
    assert set(warmups) <= set(states)
    # The shorter warmup is the longer one's prefix, bit for bit: a checkpoint of one reference run.
    manifest = read_manifest(sweep_dir)
    short, long = (
        [
            json.loads(x)
            for x in (Path(manifest["jobs"][w]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        for w in warmups
    )
    short, long = ([(r["step"], r["loss"]) for r in rows if "loss" in r] for rows in (short, long))
    assert len(long) == 2 * len(short) and long[: len(short)] == short
    results = sweep_dir / "results"
    branch = pd.read_csv(results / "cbs.csv")
    assert sorted(branch["branch_tokens"]) == [8192, 16384]
    for row in branch.itertuples():
        assert row.critical_low <= row.critical_batch <= row.critical_high
        assert row.critical_batch in (1, 2, 4) and np.isfinite(row.b_noise) and row.b_noise > 0
    fit = pd.read_csv(results / "cbs_fit.csv")
    assert len(fit) and np.isfinite(fit[["b_crit", "s_min", "e_min"]].to_numpy()).all()
    for name in ("cbs.png", "cbs_fit.png", "regime.png"):
        assert (results / name).read_bytes()[:4] == b"\x89PNG"
    assert "## critical batch size, branched" in (results / "pairs.md").read_text()


def test_data_order_replicates_share_a_warmup_per_seed_and_are_pooled(sweep_run, tmp_path):
    """`trainer.data_seed=0,1`: one warmup per data order, each arm run per order and branched from
    its order's warmup, the pair analysed per order and pooled. Run after a single-order sweep of
    the same arms, order 0 is the runs already made (found by signature), not a second copy."""
    data = f"data.cache_dir={sweep_run[0].parent / 'data'}"
    first = _sweep(tmp_path, data, "arm=A,H")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = _sweep(tmp_path, data, "arm=A,H", "trainer.data_seed=0,1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    manifest = read_manifest(sweep_dir)
    jobs = manifest["jobs"]
    for seed in (0, 1):
        warmup = jobs[f"warmup[trainer.data_seed={seed}]"]
        for arm in "AH":
            job = jobs[f"{arm}[trainer.data_seed={seed}]"]
            assert job["depends_on"] == [f"warmup[trainer.data_seed={seed}]"]
            assert job["stage"]["run"]["init_checkpoint"] == warmup["run_dir"]
            assert (job["derived"]["base"], job["derived"]["replicate"]) == (arm, f"data_seed={seed}")
    assert jobs["A[trainer.data_seed=0]"]["run_dir"] == jobs["A"]["run_dir"]  # the same run, reused
    assert jobs["warmup[trainer.data_seed=1]"]["signature"] != jobs["warmup"]["signature"]
    code, states = sweep_status(sweep_dir)
    assert code == 0 and set(states.values()) == {"completed"}
    pairs = pd.read_csv(sweep_dir / "results" / "pairs.csv")
    assert set(pairs["replicates"]) == {2}
    arms = pd.read_csv(sweep_dir / "results" / "arms.csv")
    assert set(arms["replicate"].dropna()) == {"data_seed=0", "data_seed=1"}
