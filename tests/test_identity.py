"""An arm's identity: every config field classified, the classification true, old signatures kept."""

from __future__ import annotations

import copy
import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from sweep.identity import EXCLUDED, IDENTITY, SPLIT_NODES, run_signature
from sweep.plan import build_plan
from tests.harness import REPO, compose
from train.config import ModelConfig, OptimizerConfig, RunConfig, TrainerConfig
from train.schedule import ScheduleConfig

GOLDEN = json.loads((REPO / "tests" / "golden" / "preset_signatures.json").read_text())


def _paths() -> set[str]:
    """Every field of RunConfig as a dotted path; the SPLIT_NODES (trainer, optimizer) field by field."""
    out = set()
    for f in fields(RunConfig):
        if f.name in SPLIT_NODES:
            out |= {f"{f.name}.{g.name}" for g in fields(getattr(_run(), f.name))}
        else:
            out.add(f.name)
    return out


def test_every_run_config_field_is_in_the_identity_or_excluded_with_a_reason():
    paths = _paths()
    assert not set(IDENTITY) & set(EXCLUDED), "a field cannot be both"
    unclassified = paths - set(IDENTITY) - set(EXCLUDED)
    assert not unclassified, f"classify {sorted(unclassified)} in sweep/identity.py (IDENTITY or EXCLUDED)"
    stale = (set(IDENTITY) | set(EXCLUDED)) - paths
    assert not stale, f"sweep/identity.py names fields RunConfig no longer has: {sorted(stale)}"
    assert all(reason.strip() for reason in EXCLUDED.values())


def _run(**changes: Any) -> RunConfig:
    """A run where every conditional identity field is in play: invariant Adam (its micro-batch
    counts), a Seesaw schedule, a seeded start."""
    run = RunConfig(
        name="A",
        stage="arm",
        signature="",
        run_dir="/sweeps/x/runs/A",
        data_dir="/sweeps/data/d",
        model=ModelConfig(),
        optimizer=OptimizerConfig(name="invariant_adam"),
        batch_size=16,
        token_budget=16 * 128 * 8,
        trainer=TrainerConfig(micro_batch_size=2),
        schedule=ScheduleConfig("seesaw", [0.5]),
    )
    return replace(run, **changes)


def _changed(value: Any) -> Any:
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    if is_dataclass(value) and not isinstance(value, type):
        first = fields(value)[0].name
        return replace(value, **{first: _changed(getattr(value, first))})
    raise TypeError(type(value))


def _mutated(run: RunConfig, path: str) -> RunConfig:
    run = copy.deepcopy(run)
    *parents, leaf = path.split(".")
    node: Any = run
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, _changed(getattr(node, leaf)))
    return run


# Identity fields that `_run` cannot put in play, with the changes that do.
IN_PLAY: dict[str, dict[str, Any]] = {
    "trainer.per_example_unit": {"optimizer": OptimizerConfig(name="micro_adam")},  # a per-unit update
}


@pytest.mark.parametrize("path", sorted(IDENTITY))
def test_changing_an_identity_field_changes_the_signature(path):
    run = _run(**IN_PLAY.get(path, {}))
    assert run_signature(_mutated(run, path), "data", None) != run_signature(run, "data", None)


@pytest.mark.parametrize("path", sorted(EXCLUDED))
def test_changing_an_excluded_field_keeps_the_signature(path):
    branched = _run(init_checkpoint="/sweeps/x/runs/warmup-1")  # so that moving the path is a real change
    assert run_signature(_mutated(branched, path), "data", "w1") == run_signature(branched, "data", "w1")


def test_inputs_enter_by_their_signatures_and_a_branch_replaces_the_seed():
    seeded, branched = _run(), _run(init_checkpoint="/w")
    assert run_signature(seeded, "data", None) != run_signature(seeded, "data2", None)
    assert run_signature(branched, "data", "w1") != run_signature(branched, "data", "w2")
    other_seed = replace(branched, trainer=replace(branched.trainer, init_seed=7))
    assert run_signature(other_seed, "data", "w1") == run_signature(branched, "data", "w1")
    with pytest.raises(ValueError, match="without an init_checkpoint"):
        run_signature(seeded, "data", "w1")


def test_conditional_fields_stay_out_where_they_change_nothing():
    adam = _run(optimizer=OptimizerConfig(), schedule=ScheduleConfig())
    for path in ("trainer.micro_batch_size", "schedule.halve_at"):
        assert run_signature(_mutated(adam, path), "data", None) == run_signature(adam, "data", None), path
    # AdamW with per-example statistics: the unit is what they measure, not what the run computes
    stats = replace(adam, trainer=replace(adam.trainer, per_example_stats=True))
    per_token = replace(stats, trainer=replace(stats.trainer, per_example_unit="token"))
    assert run_signature(per_token, "data", None) == run_signature(stats, "data", None)


@pytest.mark.parametrize("experiment", sorted(k for k in GOLDEN if not k.startswith("_")))
def test_existing_experiments_keep_their_signatures(experiment, tmp_path: Path):
    for variant, expected in GOLDEN[experiment].items():
        base = [f"+experiment={experiment}", f"sweep.root={tmp_path}", *variant.split()]
        arms = [a for a in expected if a != "warmup"]
        configs = [compose([*base, f"arm={a}"]) for a in arms]
        plan = build_plan(configs, [[*base, f"arm={a}"] for a in arms])
        got = {j.name: j.signature for j in plan.jobs if j.kind != "prepare"}
        assert got == expected, f"{experiment} {variant or '(defaults)'}"
