"""Arms that stop themselves once their pairs are decided (experiment.stop_when_decided), end to
end on the local launcher: a clearly non-equivalent control stops early, an equivalent pair runs
until the looks decide it, every decision is recorded with the tokens it looked at, the analysis
recomputes the same decisions and its fixed-budget verdicts agree, a rerun trains nothing, and a
decided run started again (a requeue) returns at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from records.manifest import read_manifest
from records.metrics import read_metrics
from tests.harness import REPO, STOPPING, compose, submitit_env, submitit_job_id
from tests.wandb_standin import synced

pytestmark = pytest.mark.e2e


def _sweep(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", f"sweep.root={root}", *STOPPING]
    return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=900)


def _status(run_dir: str) -> dict:
    return json.loads(Path(run_dir, "status.json").read_text())


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    out = _sweep(root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, read_manifest(root / "sqrt_rule")


def test_the_control_stops_early_and_the_equivalent_pair_runs_until_decided(stopped):
    _, manifest = stopped
    budget = 65536
    runs = {name: _status(job["run_dir"]) for name, job in manifest["jobs"].items() if job["kind"] == "arm"}
    # The small-batch arms take 4x the steps: A (large batch) runs ahead and may finish its budget
    # before its partners reach the looks that decide; they stop there.
    assert runs["H"]["state"] == runs["D"]["state"] == "decided"
    assert runs["A"]["state"] in ("decided", "completed")
    decisions = runs["D"]["decision"]["pairs"]
    control, pair = decisions["A-D"], runs["H"]["decision"]["pairs"]["A-H"]
    assert control["verdict"] == "not equivalent" and pair["verdict"] == "equivalent"
    # Each stopped arm ran past the look that decided its pairs, and stopped well short of the budget.
    assert control["tokens"] <= runs["D"]["tokens"] < budget
    assert pair["tokens"] <= runs["H"]["tokens"] < budget
    # Every arm that looked recorded the same decisions (the same rows up to each look).
    for arm in ("A", "H"):
        for name, d in runs[arm]["decision"]["pairs"].items():
            assert d == decisions.get(name, d)
    # It stopped after its last checkpoint: a checkpoint holds exactly the rows it logged.
    steps = [r["step"] for r in read_metrics(manifest["jobs"]["D"]["run_dir"]) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and runs["D"]["step"] == steps[-1]


def test_the_analysis_recomputes_the_decisions_and_the_fixed_verdicts_agree(stopped):
    root, manifest = stopped
    pairs = pd.read_csv(root / "sqrt_rule" / "results" / "pairs.csv")
    train = pairs[pairs["metric"] == "train"].set_index("pair")
    recorded = _status(manifest["jobs"]["H"]["run_dir"])["decision"]["pairs"]
    for name, d in recorded.items():
        assert train.loc[name, "sequential"] == d["verdict"]
        assert train.loc[name, "decided_tokens"] == d["tokens"]
        assert train.loc[name, "fixed_at_decision"] == d["verdict"]  # the fixed-budget test there
    text = (root / "sqrt_rule" / "results" / "pairs.md").read_text()
    assert "## sequential verdicts" in text and "Arm D stopped at" in text


def test_status_shows_the_decisions_and_what_stopping_saved(stopped):
    root, _ = stopped
    out = subprocess.run(
        [sys.executable, "-m", "sweep.status", "sqrt_rule", "--root", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "decided" in out.stdout and "A-D: not equivalent at look" in out.stdout
    assert "A-D not equivalent, look" in out.stdout  # the control's row says what decided it
    assert "A-H: equivalent at look" in out.stdout and "stopping saved" in out.stdout


def test_each_arms_wandb_run_holds_its_pairs_decisions(stopped):
    """The real client, offline, synced with `wandb sync` to the protocol stand-in: the summary of
    a stopped arm's run holds each decided pair's verdict, gap and interval."""
    _, manifest = stopped
    run_dir = Path(manifest["jobs"]["D"]["run_dir"])
    recorded = _status(str(run_dir))["decision"]["pairs"]["A-D"]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    summary = synced(offline)[manifest["jobs"]["D"]["signature"]].summary
    assert summary["verdict/A-D"] == "not equivalent" == recorded["verdict"]
    assert summary["gap/A-D"] == pytest.approx(recorded["mean_gap"], rel=1e-12)
    assert summary["ci_low/A-D"] < summary["gap/A-D"] < summary["ci_high/A-D"]
    assert summary["looks_spent"] >= recorded["look"]


def test_a_rerun_trains_nothing_and_a_decided_run_started_again_returns_at_once(stopped):
    from sweep.plan import build_plan
    from train.loop import train

    root, manifest = stopped
    again = _sweep(root)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout[-2000:]
    run_dir = manifest["jobs"]["D"]["run_dir"]
    before = Path(run_dir, "metrics.jsonl").read_text()
    job = ["+experiment=sqrt_rule", *STOPPING[:-6], "arm=D", *STOPPING[-5:], f"sweep.root={root}"]
    cfg = next(j for j in build_plan([compose(job)], [job]).jobs if j.name == "D").stage.run
    assert cfg is not None and cfg.run_dir == run_dir
    assert train(cfg) == {"name": "D", "signature": cfg.signature, "decided": True}  # as a requeue would
    assert Path(run_dir, "metrics.jsonl").read_text() == before and _status(run_dir)["state"] == "decided"


def _stage_rank(rank: int, job_id: str, cfg) -> None:
    """One rank of an arm's job as SLURM would start it: the sweep's stage, which gives the trainer
    its looks at the sweep's pairs."""
    os.environ.update(submitit_env(rank, 2, job_id))
    from sweep.stage import StageJob

    StageJob("train", run=cfg)()


def test_a_decision_stops_every_rank_of_a_ddp_arm_at_the_same_step(stopped, tmp_path):
    """Arm A trained again as 2 gloo ranks (a fresh run dir, the sweep's rows as they are): its
    first look finds its pairs decided by the rows on disk, rank 0 decides, and a step's collective
    stops both ranks at the same step; the run is `decided` with every row once."""
    from dataclasses import replace

    import torch.multiprocessing as mp

    from sweep.plan import build_plan

    root, manifest = stopped
    job = ["+experiment=sqrt_rule", *STOPPING[:-6], "arm=A", *STOPPING[-5:], f"sweep.root={root}"]
    planned = next(j for j in build_plan([compose(job)], [job]).jobs if j.name == "A").stage.run
    assert planned is not None
    cfg = replace(planned, run_dir=str(tmp_path / "A-again"))
    ctx, job_id = mp.get_context("spawn"), submitit_job_id()
    procs = [ctx.Process(target=_stage_rank, args=(r, job_id, cfg)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    status = _status(cfg.run_dir)
    first_look = 4096 + (65536 - 4096) // 4
    assert status["state"] == "decided" and status["distributed"]["world"] == 2
    steps = [r["step"] for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert steps == list(range(1, status["step"] + 1))
    assert first_look < status["tokens"] < 65536  # the look runs beside the steps: some steps later


def test_the_dry_run_says_which_arms_stop_and_bad_options_are_refused(tmp_path):
    out = _sweep(tmp_path, "arm=A,H,D,G", "sweep.dry_run=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stop_when_decided: A, H, D stop once their pairs are decided (4 looks); G run" in out.stdout
    out = _sweep(tmp_path, "experiment.pairs=[]", "experiment.controls=[]", "sweep.dry_run=true")
    assert out.returncode != 0 and "declares no pairs, so nothing is decided" in out.stdout + out.stderr
    out = _sweep(tmp_path, "experiment.decide.looks=0", "sweep.dry_run=true")
    assert (
        out.returncode != 0
        and "experiment.decide.looks=0: expected at least 1 look" in out.stdout + out.stderr
    )
