"""Faults a real sweep meets, through the real command line on the embedded study: a second sweep
command on the same sweep, a launcher killed under its running arm, Ctrl-C, a full disk, a kill in
the middle of a checkpoint write, and a sweep dir copied elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from records.manifest import read_manifest
from records.run_status import claimed_by
from tests.harness import REPO, sweep_status, tiny_run

pytestmark = pytest.mark.e2e

# Small, but long enough to act on an arm while it runs: H takes 512 one-sequence steps.
BUDGET = [
    "experiment.token_budget=65536",
    "experiment.warmup.token_budget=8192",
    "experiment.warmup.lr_warmup_tokens=0",
    "experiment.skip_tokens=0",  # sqrt_rule's declared transient is past this budget
    "trainer.val_every_tokens=32768",
    "trainer.checkpoint_every_tokens=16384",
    "hydra.launcher.analyze=false",
    "wandb.mode=disabled",  # faults of the sweep, not of W&B (its own tests are in test_trainer)
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    """The embedded corpus tokenized once for this module's sweeps (and its warmup run)."""
    root = tmp_path_factory.mktemp("cache-sweep")
    out = _sweep_cmd(root, "arm=A", "experiment.token_budget=16384")
    done = subprocess.run(out, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return f"data.cache_dir={root / 'data'}"


def _sweep_cmd(root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sweep",
        "+experiment=sqrt_rule",
        "-m",
        f"sweep.root={root}",
        *BUDGET,
        *extra,
    ]


def _start(root: Path, data_cache: str, *extra: str) -> subprocess.Popen[str]:
    """A sweep command in the background, in its own session, with Ctrl-C's default action (as a
    terminal would run it): a test suite started as a background job inherits SIGINT ignored, and
    Python then leaves it ignored in its children."""
    return subprocess.Popen(
        _sweep_cmd(root, data_cache, "arm=A,H", *extra),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(check, what: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _run_dir(sweep_dir: Path, arm: str) -> Path:
    return Path(read_manifest(sweep_dir)["jobs"][arm]["run_dir"])


def _steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _h_is_training(sweep_dir: Path) -> bool:
    try:
        run_dir = _run_dir(sweep_dir, "H")
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return (
        claimed_by(run_dir) is not None and (run_dir / "metrics.jsonl").exists() and len(_steps(run_dir)) > 5
    )


def test_a_second_sweep_command_on_the_same_sweep_refuses(data_cache, tmp_path):
    first = _start(tmp_path, data_cache)
    sweep_dir = tmp_path / "sqrt_rule"
    _wait_for(lambda: _h_is_training(sweep_dir), "arm H to train")
    second = subprocess.run(
        _sweep_cmd(tmp_path, data_cache, "arm=A,H"), cwd=REPO, capture_output=True, text=True
    )
    assert second.returncode != 0 and "another sweep command is working on this sweep" in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    for arm, steps in (("A", 128), ("H", 512)):
        assert _steps(_run_dir(sweep_dir, arm)) == list(range(1, steps + 1)), arm  # one writer each


def test_a_killed_launcher_leaves_its_arm_running_and_the_rerun_does_not_start_it_again(data_cache, tmp_path):
    first = _start(tmp_path, data_cache)
    sweep_dir = tmp_path / "sqrt_rule"
    _wait_for(lambda: _h_is_training(sweep_dir), "arm H to train")
    os.kill(first.pid, signal.SIGKILL)  # the launcher only: its job goes on as an orphan
    first.wait()
    h = _run_dir(sweep_dir, "H")
    assert claimed_by(h) is not None
    again = subprocess.run(
        _sweep_cmd(tmp_path, data_cache, "arm=A,H"), cwd=REPO, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "H (running)" in again.stdout and "submitted H" not in again.stdout
    _wait_for(lambda: claimed_by(h) is None, "the orphaned arm to finish", timeout=600)
    assert json.loads((h / "status.json").read_text())["state"] == "completed"
    assert _steps(h) == list(range(1, 513))  # never a second trainer beside it


def test_ctrl_c_stops_the_arms_at_a_checkpoint_and_the_rerun_resumes(data_cache, tmp_path):
    first = _start(tmp_path, data_cache)
    sweep_dir = tmp_path / "sqrt_rule"
    _wait_for(lambda: _h_is_training(sweep_dir), "arm H to train")
    os.killpg(first.pid, signal.SIGINT)  # what a terminal sends the whole foreground group
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1 and "resume with the same command" in err, err[-3000:]
    h = _run_dir(sweep_dir, "H")
    status = json.loads((h / "status.json").read_text())
    assert status["state"] == "stopped" and "checkpointed" in status["error"]
    code, states = sweep_status(sweep_dir)
    assert states["H"] == "stopped" and code == 0  # resumable: not an error
    again = subprocess.run(
        _sweep_cmd(tmp_path, data_cache, "arm=A,H"), cwd=REPO, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(h) == list(range(1, 513))


def test_cancel_stops_a_local_sweep_at_a_checkpoint_and_resubmit_resumes_it_here(data_cache, tmp_path):
    """`sweep.cancel` on a sweep that runs here stops its launcher and its arms (checkpointed);
    `sweep.resubmit` without flags runs them here again, as the manifest says the sweep ran."""
    first = _start(tmp_path, data_cache)
    sweep_dir = tmp_path / "sqrt_rule"
    _wait_for(lambda: _h_is_training(sweep_dir), "arm H to train")
    cancel = subprocess.run(
        [sys.executable, "-m", "sweep.cancel", str(sweep_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert cancel.returncode == 0 and "stopping the launcher" in cancel.stdout, cancel.stderr[-2000:]
    assert "stopping H (pid" in cancel.stdout
    first.communicate(timeout=300)
    h = _run_dir(sweep_dir, "H")
    _wait_for(lambda: claimed_by(h) is None, "arm H to stop")
    assert json.loads((h / "status.json").read_text())["state"] == "stopped"
    again = subprocess.run(
        [sys.executable, "-m", "sweep.resubmit", str(sweep_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(h) == list(range(1, 513))
    assert json.loads((h / "status.json").read_text())["state"] == "completed"


def test_a_copied_sweep_dir_acts_on_its_own_runs(data_cache, tmp_path):
    root = tmp_path / "original"
    done = subprocess.run(_sweep_cmd(root, data_cache, "arm=A,H"), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    original = root / "sqrt_rule"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in original.rglob("*") if p.is_file()}
    copy = tmp_path / "elsewhere" / "sqrt_rule"
    shutil.copytree(original, copy)
    code, states = sweep_status(copy)
    assert code == 0 and set(states.values()) == {"completed"}
    # One arm of the copy must run again: the copy resubmits it into the copy.
    h = _run_dir(copy, "H")
    assert h.is_relative_to(copy)
    status = json.loads((h / "status.json").read_text())
    (h / "status.json").write_text(json.dumps({**status, "state": "failed", "error": "test"}))
    redo = subprocess.run(
        [sys.executable, "-m", "sweep.resubmit", str(copy), "--local"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert json.loads((h / "status.json").read_text())["state"] == "completed"
    analysis = subprocess.run(
        [sys.executable, "-m", "analysis", f"sweep.dir={copy}", "+experiment=sqrt_rule"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert analysis.returncode == 0 and (copy / "results" / "pairs.csv").exists(), analysis.stderr[-2000:]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in original.rglob("*") if p.is_file()}
    assert after == before  # the original is untouched


def test_a_kill_inside_a_checkpoint_write_leaves_nothing_behind_once_resumed(prepared_data, tmp_path):
    from train.loop import train

    cfg = tiny_run(
        prepared_data, tmp_path / "run", token_budget=8 * 32 * 4, checkpoint_every_tokens=8 * 32 * 2
    )
    litter = [
        tmp_path / "run" / "checkpoints" / ".step-00000002.pt.tmp-999999",  # a dead writer's half file
        tmp_path / "run" / ".status.json.tmp-999999",
    ]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    train(cfg)
    assert not any(p.exists() for p in litter)
    assert not list((tmp_path / "run").rglob("*.tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 384 KiB tmpfs (root only): room for the run's files, not for its checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_recorded_as_failed_and_the_partial_file_removed(prepared_data, small_disk):
    from train.loop import train

    cfg = tiny_run(
        prepared_data, small_disk / "run", token_budget=8 * 32 * 4, checkpoint_every_tokens=8 * 32 * 2
    )
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    status = json.loads((small_disk / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"]
    assert not list((small_disk / "run").rglob("*.tmp-*"))  # the half-written checkpoint is gone


def test_a_job_that_fails_at_run_time_is_reported_with_its_error_line(tmp_path):
    """A data dir with no text in it passes the plan (it exists) and fails when tokenized: the
    sweep names the error, not only submitit's 'FailedJobError: <log path>'."""
    empty = tmp_path / "texts"
    empty.mkdir()
    cmd = _sweep_cmd(tmp_path / "root", "arm=A", "data.source=text_files", f"data.path={empty}")
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert f"prepare: failed: FileNotFoundError: data.path='{empty}' holds no *.txt files" in out.stderr
    assert "warmup: skipped" in out.stdout and "Traceback" not in out.stdout + out.stderr
