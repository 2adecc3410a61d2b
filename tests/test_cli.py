"""The command-line surface: console scripts, --help that says what the tool is, shell completion,
and a non-editable install (the wheel carries conf/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import DRY_RUN, REPO

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("script", ["bss-sweep", "bss-status", "bss-resubmit", "bss-cancel", "bss-analysis"])
def test_console_scripts_are_installed(script, tmp_path):
    out = _run([str(BIN / script), "--help"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


def test_help_describes_the_tool_and_its_groups(tmp_path):
    sweep = _run([str(BIN / "bss-sweep"), "--help"], tmp_path).stdout
    assert "batch-size-scaling study for Adam" in sweep and "is powered by Hydra" not in sweep
    assert (
        "experiment: cbs, invariant_adam, linear_vs_sqrt, per_example_adam, seesaw, sign_placement," in sweep
    )
    analysis = _run([str(BIN / "bss-analysis"), "--help"], tmp_path).stdout
    assert "compare a sweep's arms pair by pair" in analysis and "analysis:" in analysis
    assert "rule: " not in analysis  # the sweep's config groups are not the analysis's


def test_shell_completion_script(tmp_path):
    out = _run([str(BIN / "bss-sweep"), "-sc", "install=bash"], tmp_path)
    assert out.returncode == 0 and "complete" in out.stdout and "bss-sweep" in out.stdout


@pytest.mark.e2e
def test_a_non_editable_install_carries_its_configs(tmp_path):
    """`pip install .` (a wheel, not the checkout): the package finds conf/ inside itself."""
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        REPO,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("bss_sweep-*.whl"))
    target = tmp_path / "site"
    done = _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    env = {"PYTHONPATH": str(target), "PATH": str(BIN)}
    where = _run(
        [sys.executable, "-c", "import records; print(records.__file__, records.config_dir())"],
        tmp_path,
        env=env,
    )
    assert where.stdout.split() == [str(target / "records" / "__init__.py"), str(target / "records" / "conf")]
    dry = _run(
        [*DRY_RUN, f"sweep.root={tmp_path}"],
        tmp_path,
        env=env,
    )
    assert dry.returncode == 0 and "dry run: wrote" in dry.stdout, dry.stderr[-3000:]
