"""The SLURM side against a real controller and node (slurm/cluster.sh up): submit-and-return,
stage chains, DDP through srun, failures SLURM calls COMPLETED, scancel + resubmit, and a time
limit that checkpoints, requeues and finishes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from records.manifest import read_manifest
from tests.harness import REPO, STOPPING, TINY, compose, sweep_status
from train.data import prepare

# Under xdist (make test) this module runs on one worker (--dist loadscope): its tests share one
# cluster, and one of them restarts it with accounting.
pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

ALL = ["prepare", "warmup", "A", "H", "B", "J"]
PAIRS_ONLY = "arm=A,H,B,J"  # the two declared pairs of sqrt_rule: the full matrix would crowd 2 cores


def _sweep(
    root: Path, *extra: str, tiny: bool = True, launcher: str = "slurm"
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", f"sweep.root={root}"]
    cmd += [*(TINY if tiny else []), f"hydra/launcher={launcher}"]
    cmd += ["resources.cpus_per_task=1", "resources.timeout_min=20", "hydra.launcher.analyze=false"]
    cmd += extra if any(e.startswith("arm=") for e in extra) else [PAIRS_ONLY, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _manifest(sweep_dir: Path) -> dict:
    return read_manifest(sweep_dir)  # run dirs resolved (the file holds them relative to the sweep)


def _release_held(job_ids: list[str]) -> None:
    """SLURM holds a requeued job before it may start again (BeginTime); start it now."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%r"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        job_id, _, reason = line.partition("|")
        if job_id in job_ids and reason.strip() in ("BeginTime", "JobHeldAdmin", "JobHeldUser"):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            subprocess.run(["scontrol", "release", job_id], capture_output=True)


def _wait(sweep_dir: Path, names: list[str], timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    while time.time() < deadline:
        _, states = sweep_status(sweep_dir)
        if all(states.get(n) not in (None, "pending", "running") for n in names):
            return states
        _release_held([j["job_ids"][-1] for j in _manifest(sweep_dir)["jobs"].values() if j.get("job_ids")])
        time.sleep(2)
    return states


def _losses(run_dir: str | Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [(r["tokens"], r["loss"]) for r in rows if "loss" in r]


def test_sweep_submits_a_chain_returns_and_completes(slurm_cluster, tmp_path):
    out = _sweep(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    ids = {name: job["job_ids"][-1] for name, job in _manifest(sweep_dir)["jobs"].items()}
    assert sorted(ids) == sorted(ALL)
    for name, job_id in ids.items():
        assert f"submitted {name}: job {job_id}" in out.stdout
    assert "python -m sweep.status" in out.stdout
    # It returned while the chain was still queued: the arms wait on the warmup (afterok).
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i %E"], capture_output=True, text=True, timeout=30
    ).stdout
    deps = dict((line.split(maxsplit=1) + [""])[:2] for line in queued.splitlines())
    assert ids["A"] in deps, "the launcher waited for the jobs instead of returning"
    assert ids["warmup"] in deps[ids["A"]]

    assert _wait(sweep_dir, ALL) == dict.fromkeys(ALL, "completed")
    again = _sweep(tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    assert "submitted" not in again.stdout


def test_a_two_host_arm_trains_across_hosts_and_resumes_a_requeue_exactly(slurm_cluster, tmp_path):
    """Arm A (and its warmup) as 2 nodes x 1 rank on partition `twohost`: two hosts, each a
    network namespace with its own hostname and address (slurm/cluster.sh). The ranks rendezvous
    through what submitit exports and train over gloo across the hosts; SLURM's warning signal
    stops the arm midway, it requeues itself and resumes. Its rows equal, bit for bit, those of the
    same arm run as 2 ranks on one host without interruption, and those of 1 process up to the
    rounding of the 2-rank reduction."""
    common = ["arm=A", "experiment.token_budget=65536", "trainer.checkpoint_every_tokens=16384"]
    common.append(f"data.cache_dir={tmp_path / 'data'}")  # tokenized once, for both sweeps
    for name, tasks in (("one-process", 1), ("one-host", 2)):
        reference = _sweep(tmp_path / name, *common, f"resources.tasks_per_node={tasks}", launcher="local")
        assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    hosts = ["resources.nodes=2", "resources.tasks_per_node=1", "resources.partition=twohost"]
    out = _sweep(tmp_path, *common, *hosts, "resources.max_requeues=3")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "already completed, skipped: prepare" in out.stdout
    sweep_dir = tmp_path / "sqrt_rule"
    run_dir = Path(_manifest(sweep_dir)["jobs"]["A"]["run_dir"])
    deadline = time.time() + 300
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*.pt.sha256")):
        time.sleep(0.2)
    job_id = _manifest(sweep_dir)["jobs"]["A"]["job_ids"][-1]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # as before a time limit
    assert _wait(sweep_dir, ["warmup", "A"]) == {
        **_wait(sweep_dir, []),
        "warmup": "completed",
        "A": "completed",
    }

    status = json.loads((run_dir / "status.json").read_text())
    assert status["launch"]["restarts"] >= 1 and status["launch"]["nodelist"] == "bss-n[1-2]"
    assert status["distributed"] == {
        "world": 2,
        "hosts": 2,
        "backend": "gloo",
        "reason": "no rank holds a GPU",
    }
    logs = sorted(p.name for p in (sweep_dir / "jobs").glob(f"{job_id}_*_log.out"))
    assert logs == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]
    one_host, one_process = (
        _losses(_manifest(tmp_path / name / "sqrt_rule")["jobs"]["A"]["run_dir"])
        for name in ("one-host", "one-process")
    )
    across = _losses(run_dir)
    assert [t for t, _ in across] == [t for t, _ in one_host]  # no row missing or repeated
    assert across == one_host
    # fp32 sums of two halves against one sum, through the warmup's and the arm's steps: measured
    # within 1e-6 over the 128 rows; 1e-5 as in tests/test_trainer.py's 2-rank check
    assert [t for t, _ in across] == [t for t, _ in one_process]
    assert [a for _, a in across] == pytest.approx([b for _, b in one_process], rel=1e-5)


def test_an_arm_whose_python_raises_is_failed(slurm_cluster, tmp_path):
    out = _sweep(tmp_path, "arm=H", "experiment.arms.H.token_budget=16777216")  # more than the split holds
    assert out.returncode == 0
    sweep_dir = tmp_path / "sqrt_rule"
    assert _wait(sweep_dir, ["H"])["H"] == "failed"
    code, _ = sweep_status(sweep_dir)
    assert code == 1
    status = json.loads(Path(_manifest(sweep_dir)["jobs"]["H"]["run_dir"], "status.json").read_text())
    assert "the run reads 131072 sequences" in status["error"]  # checked when the data exists

    # The explicit resubmit reads the manifest (no config needed) and submits only what failed.
    first_id = _manifest(sweep_dir)["jobs"]["H"]["job_ids"][-1]
    again = subprocess.run(
        [sys.executable, "-m", "sweep.resubmit", str(sweep_dir), "--failed"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted H:" in again.stdout and "submitted warmup" not in again.stdout
    assert _manifest(sweep_dir)["jobs"]["H"]["job_ids"][-2] == first_id
    assert _wait(sweep_dir, ["H"])["H"] == "failed"


def test_scancel_then_rerun_resumes_only_that_arm_exactly(slurm_cluster, tmp_path):
    long_arm = ["experiment.token_budget=262144", "trainer.checkpoint_every_tokens=16384"]
    reference = _sweep(tmp_path / "reference", "arm=A", *long_arm, launcher="local")
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = _sweep(tmp_path, "arm=A,J", *long_arm)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    run_dir = Path(_manifest(sweep_dir)["jobs"]["A"]["run_dir"])
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run_dir / "checkpoints").glob("step-*.pt"))) < 2:
        time.sleep(0.5)
    first_id = _manifest(sweep_dir)["jobs"]["A"]["job_ids"][-1]
    subprocess.run(["scancel", first_id], check=True)
    states = _wait(sweep_dir, ["A", "J"])
    assert states["A"] == "stopped" and states["J"] == "completed"  # scancel: SIGTERM, checkpointed

    again = _sweep(tmp_path, "arm=A,J", *long_arm)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "A: stopped" in again.stdout and "submitted A:" in again.stdout and "submitted J" not in again.stdout
    )
    assert _wait(sweep_dir, ["A"])["A"] == "completed"
    assert _manifest(sweep_dir)["jobs"]["A"]["job_ids"][-2:] == [
        first_id,
        _manifest(sweep_dir)["jobs"]["A"]["job_ids"][-1],
    ]
    reference_dir = _manifest(tmp_path / "reference" / "sqrt_rule")["jobs"]["A"]["run_dir"]
    resumed, uninterrupted = _losses(run_dir), _losses(reference_dir)
    assert [t for t, _ in resumed] == [t for t, _ in uninterrupted]  # no row missing or repeated
    assert resumed == uninterrupted  # bit-identical on CPU


def test_time_limit_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path):
    # 2-minute limit, USR2 90 s before it (SLURM sends it up to ~30 s early): the arm (~40 s of
    # training) is stopped, checkpoints, requeues itself, and finishes in a later run.
    extra = ["resources.timeout_min=2", "resources.signal_lead_s=90", "resources.max_requeues=20"]
    # Tokenize first: under this limit the signal can reach the prepare job while Python is still
    # importing, before any handler exists, and kill it (prepare has nothing to checkpoint anyway).
    data = compose(["+experiment=sqrt_rule", f"sweep.root={tmp_path}"]).data
    prepare(replace(data, cache_dir=str(tmp_path / "data")), progress=False)
    out = _sweep(tmp_path, "arm=A", *extra, tiny=False)
    assert "already completed, skipped: prepare" in out.stdout
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    assert _wait(sweep_dir, ["A"], timeout=900)["A"] == "completed"
    run_dir = Path(_manifest(sweep_dir)["jobs"]["A"]["run_dir"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["launch"]["restarts"] >= 1
    tokens = [t for t, _ in _losses(run_dir)]
    assert tokens == sorted(set(tokens)) and tokens[-1] == status["token_budget"]


def test_arms_as_a_job_array_with_a_parallelism_limit(slurm_cluster, tmp_path):
    out = _sweep(tmp_path, "arm=A,J", "resources.array_parallelism=1")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    jobs = _manifest(sweep_dir)["jobs"]
    array = {jobs[a]["job_ids"][-1].split("_")[0] for a in "AJ"}
    assert len(array) == 1 and sorted(jobs[a]["job_ids"][-1].split("_")[1] for a in "AJ") == ["0", "1"]
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    assert f"{array.pop()}_[0-1%1]" in queued  # one array, at most one task at a time
    assert _wait(sweep_dir, ["A", "J"]) == {**_wait(sweep_dir, []), "A": "completed", "J": "completed"}


def _cluster(*args: str) -> None:
    subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), *args], check=True, timeout=600)


@pytest.mark.parametrize("accounting", [False, True], ids=["no-sacct", "sacct"])
def test_a_job_cancelled_before_it_started(slurm_cluster, tmp_path, accounting):
    """Without accounting, a job that left the queue and never wrote a status is `lost`; with
    `sacct`, SLURM's own word (CANCELLED) makes it `failed`. Both are resubmitted."""
    if accounting:
        _cluster("up", "--accounting")
    try:
        out = _sweep(tmp_path, "arm=A")
        assert out.returncode == 0, out.stderr[-3000:]
        sweep_dir = tmp_path / "sqrt_rule"
        job_id = _manifest(sweep_dir)["jobs"]["A"]["job_ids"][-1]
        subprocess.run(["scancel", job_id], check=True)  # still waiting on prepare and warmup
        deadline = time.time() + 60
        while (
            time.time() < deadline
            and job_id
            in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        ):
            time.sleep(1)
        code, states = sweep_status(sweep_dir)
        assert code == 1
        assert states["A"] == ("failed" if accounting else "lost")
        again = _sweep(tmp_path, "arm=A")
        assert f"A: {states['A']}" in again.stdout and "submitted A:" in again.stdout
        subprocess.run([sys.executable, "-m", "sweep.cancel", str(sweep_dir)], cwd=REPO, check=True)
    finally:
        if accounting:
            _cluster("up")  # back to a cluster without accounting, as most tests expect


def test_two_sweep_commands_at_once_submit_each_job_once(slurm_cluster, tmp_path):
    """The second command waits for the first to submit (the sweep dir's claim), then finds every
    job queued or done and leaves it alone."""
    cmd = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", f"sweep.root={tmp_path}", *TINY]
    cmd += ["hydra/launcher=slurm", "resources.cpus_per_task=1", "hydra.launcher.analyze=false", "arm=A"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "12"
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    sweep_dir = tmp_path / "sqrt_rule"
    jobs = _manifest(sweep_dir)["jobs"]
    assert {name: len(job["job_ids"]) for name, job in jobs.items()} == {"prepare": 1, "warmup": 1, "A": 1}
    assert sum(out.count("submitted ") for out, _ in outs) == 3
    assert _wait(sweep_dir, ["prepare", "warmup", "A"]) == dict.fromkeys(
        ["prepare", "warmup", "A"], "completed"
    )


def test_arms_stop_once_decided_and_a_rerun_submits_none_of_them(slurm_cluster, tmp_path):
    """experiment.stop_when_decided under the SLURM launcher (which submits and returns), on a
    cluster that runs one job at a time: each arm finds the earlier arms' rows on the shared file
    system; the control, last, stops at the look that decides it (state `decided`), and a rerun
    of the sweep submits none of them."""
    out = _sweep(tmp_path, *STOPPING, tiny=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    states = _wait(sweep_dir, ["prepare", "warmup", "A", "H", "D"])
    assert states["D"] == "decided" and {states["A"], states["H"]} <= {"decided", "completed"}, states
    status = json.loads(Path(_manifest(sweep_dir)["jobs"]["D"]["run_dir"], "status.json").read_text())
    decision = status["decision"]["pairs"]["A-D"]
    assert decision["verdict"] == "not equivalent" and decision["tokens"] <= status["tokens"] < 65536
    again = _sweep(tmp_path, *STOPPING, tiny=False)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout[-2000:]
    assert "submitted" not in again.stdout and "(decided)" in again.stdout
