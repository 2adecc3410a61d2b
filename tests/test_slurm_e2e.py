"""The SLURM launcher against a real controller and node (slurm/cluster.sh up): submit and return."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, sweep_status
from tests.test_e2e import TINY

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def _sweep(root: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "+experiment=sqrt_rule",
        "-m",
        f"sweep.root={root}",
        *TINY,
        "hydra/launcher=slurm",
        "resources.cpus_per_task=1",
        "resources.timeout_min=20",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sweep_submits_a_chain_returns_and_completes(slurm_cluster, tmp_path):
    out = _sweep(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sqrt_rule"
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    ids = {name: job["job_ids"][-1] for name, job in manifest["jobs"].items()}
    assert sorted(ids) == ["A", "B", "H", "J", "prepare", "warmup"]
    for name, job_id in ids.items():
        assert f"submitted {name}: job {job_id}" in out.stdout
    assert "python -m sweep.status" in out.stdout
    # It returned while the chain was still queued: the arms wait on the warmup (afterok).
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i %E", "-j", ",".join(ids.values())],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert queued.strip(), "the launcher waited for the jobs instead of returning"
    deps = dict(line.split(maxsplit=1) for line in queued.splitlines() if len(line.split()) > 1)
    if ids["A"] in deps:
        assert ids["warmup"] in deps[ids["A"]]

    deadline = time.time() + 600
    while time.time() < deadline:
        _, states = sweep_status(sweep_dir)
        if all(s in ("completed", "failed", "diverged") for s in states.values()) and len(states) == 6:
            break
        time.sleep(3)
    assert states == dict.fromkeys(["prepare", "warmup", "A", "H", "B", "J"], "completed")

    again = _sweep(tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stdout
