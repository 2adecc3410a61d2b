"""The manifest: a plan recorded and rebuilt without recomposing; one written by other code refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from sweep.manifest import plan_from_manifest, record_plan
from sweep.plan import build_plan
from tests.harness import REPO, compose


def _recorded(tmp_path):
    base = ["+experiment=sqrt_rule", f"sweep.root={tmp_path}"]
    plan = build_plan([compose([*base, f"arm={a}"]) for a in "AH"], [[*base, f"arm={a}"] for a in "AH"])
    record_plan(plan)
    return plan


def test_a_recorded_plan_comes_back_as_it_was_planned(tmp_path):
    plan = _recorded(tmp_path)
    again = plan_from_manifest(plan.dir)
    assert [asdict(j.stage) for j in again.jobs] == [asdict(j.stage) for j in plan.jobs]
    assert (again.name, again.pairs, again.ops, again.resources) == (
        plan.name,
        plan.pairs,
        plan.ops,
        plan.resources,
    )


def test_a_manifest_from_another_version_is_refused_with_what_to_do(tmp_path):
    plan = _recorded(tmp_path)
    path = plan.dir / "manifest.json"
    manifest = json.loads(path.read_text())
    run = manifest["jobs"]["A"]["stage"]["run"]
    run["seq_len"] = run["trainer"].pop("seq_len")  # the layout before the trainer config was nested
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match="another version of this code.*seq_len.*run the sweep command again"
    ):
        plan_from_manifest(plan.dir)
    out = subprocess.run(
        [sys.executable, "-m", "sweep.resubmit", "sqrt_rule", "--root", str(tmp_path), "--local"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "another version" in out.stderr and "Traceback" not in out.stderr
