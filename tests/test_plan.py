"""Composition of every experiment, the arm table, signatures and refusals before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sweep.plan import PlanError, build_plan
from tests.harness import DRY_RUN, FAMILY_SHAPES, REPO, compose

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _plan(overrides: list[str], arms: list[str], tmp_path: Path):
    base = [f"sweep.root={tmp_path}", *overrides]
    return build_plan([compose([*base, f"arm={a}"]) for a in arms], [[*base, f"arm={a}"] for a in arms])


def _arms(experiment: str) -> list[str]:
    return list(compose([f"+experiment={experiment}"]).experiment.arms)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_dry_runs(experiment, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweep",
            f"+experiment={experiment}",
            "-m",
            "sweep.dry_run=true",
            f"sweep.root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / experiment / "plan.json").read_text())
    assert sorted(r["arm"] for r in plan) == sorted(_arms(experiment))
    keys = {
        "arm",
        "op",
        "rule",
        "batch_size",
        "seq_len",
        "micro_batch_size",
        "grad_accum",
        "lr",
        "beta1",
        "beta2",
    }
    assert keys | {"eps", "token_budget", "signature"} <= set(plan[0])
    assert not (tmp_path / experiment / "runs").exists()  # a dry run runs nothing
    assert "signature" in out.stdout and "beta2" in out.stdout  # the arm table was printed


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_plans_on_every_family(experiment, tmp_path):
    """`model=llama_tiny` etc.: each preset plans on every family's tiny shape, its FLOPs from that
    family's count. Hydra composes the preset with one family (the families taken in turn: each
    is composed with some preset); the others are the same configs with their model swapped (no
    preset sets a model key), which keeps the suite's composing to one pass a preset."""
    from dataclasses import replace

    from tests.harness import model_shape

    composed = FAMILY_SHAPES[EXPERIMENTS.index(experiment) % len(FAMILY_SHAPES)]
    arms = _arms(experiment)
    jobs = [
        [f"+experiment={experiment}", f"model={composed}", f"sweep.root={tmp_path}", f"arm={a}"] for a in arms
    ]
    configs = [compose(j) for j in jobs]
    for model in FAMILY_SHAPES:
        shape = model_shape(model)
        assert model != composed or all(c.model == shape for c in configs)
        plan = build_plan([replace(c, model=shape) for c in configs], jobs)
        assert {j.name for j in [*plan.arms, *plan.aliases]} == set(arms), model
        for job in plan.arms:
            assert job.stage.run is not None and job.stage.run.model.arch == shape.arch
            assert job.stage.run.model.matmul_params == shape.matmul_params


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_dry_runs_at_the_seed_scale(experiment, tmp_path):
    """`study=seed`: the 0.5B model on FineWeb-Edu, seq 2048, bf16, 8 GPUs per node through the SLURM
    launcher; the table shows each arm's per-rank micro-batch, accumulation and GPU-hours."""
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        f"+experiment={experiment}",
        "study=seed",
        "-m",
        "sweep.dry_run=true",
    ]
    out = subprocess.run(
        [*cmd, f"sweep.root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if line.startswith("arm "))
    assert header.split()[-1] == "gpu_hours" and "micro_batch_size" in header
    assert "GPU-hours in all on 8 ranks (1 node x 8 GPUs)" in out.stdout
    launcher = subprocess.run(
        [*cmd[:5], "--cfg", "hydra", "-p", "hydra.launcher"], cwd=REPO, capture_output=True, text=True
    )
    assert "executor: slurm" in launcher.stdout  # submits to SLURM, whatever hydra/launcher says
    plan = json.loads((tmp_path / experiment / "plan.json").read_text())
    assert sorted(r["arm"] for r in plan if r["arm"] != "warmup") == sorted(_arms(experiment))
    flops_per_token = 6 * 494_032_768 + 12 * 24 * 896 * 2048  # the 0.5B model at seq 2048
    for row in plan:
        assert row["seq_len"] == 2048 and row["gpu_hours"] == pytest.approx(
            row["flops"] / (989.4e12 * 0.4 * 3600)
        )
        # every rank takes an equal share of the batch, in micro-batches of at most 8 sequences
        assert row["micro_batch_size"] * row["grad_accum"] * 8 == row["batch_size"]
        assert row["micro_batch_size"] <= 8
        assert row["flops"] == row["token_budget"] * flops_per_token


def test_the_seed_studys_sqrt_rule_is_the_seed_matrix(tmp_path):
    cfg = compose(["+experiment=sqrt_rule", "study=seed"])
    assert (cfg.model.name, cfg.data.name, cfg.data.tokenizer.name) == (
        "qwen2_5_0_5b",
        "HuggingFaceFW/fineweb-edu",
        "Qwen/Qwen2.5-0.5B",
    )
    plan = _plan(["+experiment=sqrt_rule", "study=seed"], ["A", "H", "J"], tmp_path)
    rows = {j.name: j.row for j in plan.jobs if j.row}
    # the seed's table (Fast-LLM batch_size_scaling): A 512 seqs lr 1e-4; H 32 seqs lr 2.5e-5; J lr 4e-4
    assert (rows["A"]["batch_size"], rows["H"]["batch_size"]) == (512, 32)
    assert (rows["A"]["lr"], rows["H"]["lr"], rows["J"]["lr"]) == pytest.approx((1e-4, 2.5e-5, 4e-4))
    # 2^31 tokens at 3.49 GFLOP/token over 40% of an H100's 989.4 TFLOP/s: 5.3 GPU-hours per arm
    from sweep.plan import arm_table

    line = next(x for x in arm_table(plan).splitlines() if x.startswith("A "))
    assert line.split()[-1] == "5.3"


def test_sqrt_rule_arms_follow_the_seed_relations(tmp_path):
    plan = _plan(["+experiment=sqrt_rule"], ["A", "H", "B", "J"], tmp_path)
    rows = {j.name: j.row for j in plan.arms}
    a, h, b, j = rows["A"], rows["H"], rows["B"], rows["J"]
    r = a["batch_size"] // h["batch_size"]
    # The embedded default runs at r = 4 (large batch 4, below the tiny model's noise scale).
    assert r == 4 and j["batch_size"] == a["batch_size"] and b["batch_size"] == h["batch_size"]
    assert h["lr"] == pytest.approx(a["lr"] / 2) and h["beta1"] == pytest.approx(a["beta1"] ** (1 / r))
    assert h["eps"] == pytest.approx(a["eps"] * 2)
    assert (
        b["lr"] == a["lr"] and b["beta1"] == a["beta1"] and b["beta2"] == pytest.approx(a["beta2"] ** (1 / r))
    )
    assert (
        j["lr"] == pytest.approx(2 * a["lr"])
        and j["beta1"] == a["beta1"]
        and j["beta2"] == pytest.approx(0.95)
    )
    assert len({row["token_budget"] for row in rows.values()}) == 1  # matched budgets
    assert plan.pairs == [["A", "H"], ["J", "B"]] and plan.controls == [["A", "D"]]
    assert plan.yardstick == [["A", "J"], ["H", "B"]]  # the README's yardstick: same batch, other point


def test_sqrt_rule_holds_the_full_seed_matrix(tmp_path):
    arms = ["A", "H", "I", "G", "B", "M", "D", "J", "K05", "K2", "L"]
    assert _arms("sqrt_rule") == arms
    plan = _plan(["+experiment=sqrt_rule"], arms, tmp_path)
    rows = {j.name: j.row for j in plan.arms}
    runs = {j.name: j.stage.run for j in plan.arms}
    a, r = rows["A"], 4
    small = {n: rows[n] for n in "HIGBMD"}
    assert {row["batch_size"] for row in small.values()} == {a["batch_size"] // r}
    # (lr factor, beta1 scaled?, beta2 scaled?) per small arm, the seed's definitions.
    expected = {
        "H": (1 / 2, 1, 1),
        "I": (1 / 2, 0, 1),
        "G": (1 / 2, 0, 0),
        "B": (1, 0, 1),
        "M": (1, 1, 1),
        "D": (1, 0, 0),
    }
    for name, (lr, b1, b2) in expected.items():
        row = small[name]
        assert row["lr"] == pytest.approx(a["lr"] * lr), name
        assert row["beta1"] == pytest.approx(a["beta1"] ** (1 / r) if b1 else a["beta1"]), name
        assert row["beta2"] == pytest.approx(a["beta2"] ** (1 / r) if b2 else a["beta2"]), name
    assert (rows["K05"]["lr"], rows["K2"]["lr"]) == (pytest.approx(a["lr"] / 2), pytest.approx(a["lr"] * 2))
    assert runs["L"].precision == "fp16" and rows["L"]["setup"] == "fp16" and runs["A"].precision == "fp32"
    assert {rows[n]["signature"] for n in arms} == {j.signature for j in plan.arms}  # all distinct runs
    assert all(run.schedule.kind == "constant" and run.optimizer.name == "adamw" for run in runs.values())


def test_invariant_adam_arms_carry_their_micro_batch_in_their_identity(tmp_path):
    plan = _plan(["+experiment=invariant_adam"], ["S16", "V16", "V4"], tmp_path)
    runs = {j.name: j.stage.run for j in plan.arms}
    assert runs["V4"].optimizer.name == "invariant_adam" and runs["S16"].optimizer.name == "adamw"
    assert runs["V4"].optimizer.lr == pytest.approx(runs["V16"].optimizer.lr / 4)  # linear scaling
    assert runs["V4"].optimizer.beta2 == pytest.approx(runs["V16"].optimizer.beta2 ** (1 / 4))
    other = _plan(
        ["+experiment=invariant_adam", "trainer.micro_batch_size=2"], ["S16", "V16"], tmp_path / "b"
    )
    sig = {j.name: j.signature for j in other.arms}
    assert sig["V16"] != runs["V16"].signature  # another micro-batch size is another invariant-Adam run
    assert sig["S16"] == runs["S16"].signature  # ... but the same standard-Adam run


def test_seesaw_arms_are_laid_out_before_submission(tmp_path):
    plan = _plan(["+experiment=seesaw"], ["SD", "SS", "C"], tmp_path)
    rows = {j.name: j.row for j in plan.arms}
    assert rows["SS"]["steps"] < rows["SD"]["steps"] == rows["C"]["steps"]
    assert rows["SS"]["setup"] == "seesaw" and rows["SD"]["setup"] == "step_decay"
    assert len({rows[n]["signature"] for n in rows}) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+experiment=invariant_adam", "experiment.arms.V16.precision=fp16"],
            "invariant_adam does not support fp16",
        ),
        (["+experiment=seesaw", "experiment.schedule.halve_at=[0.3]"], "does not end on the token budget"),
        (["+experiment=seesaw", "experiment.arms.SS.schedule=zigzag"], "schedule 'zigzag'"),
        (["+experiment=invariant_adam", "experiment.arms.V16.optimizer=lion"], "optimizer.name='lion'"),
    ],
)
def test_bad_arm_options_are_refused_before_anything_runs(overrides, message, tmp_path):
    arms = [a for a in _arms(overrides[0].split("=")[1]) if a in ("V16", "SS")]
    with pytest.raises(PlanError, match=message):
        _plan(overrides, arms, tmp_path)


def test_seed_scale_override_line(tmp_path):
    plan = _plan(
        [
            "+experiment=sqrt_rule",
            "model=qwen2_5_0_5b",
            "op@ops.base=seed_baseline",
            "experiment.ratio=16",
            "experiment.lr_scale=1",  # the embedded study runs sqrt_rule's arms at lr/4
            "experiment.token_budget=1048576000",
        ],
        ["A", "H", "J"],
        tmp_path,
    )
    rows = {j.name: j.row for j in plan.arms}
    assert (rows["A"]["batch_size"], rows["A"]["lr"]) == (512, 1e-4)
    assert (rows["H"]["batch_size"], rows["H"]["lr"]) == (32, pytest.approx(2.5e-5))
    assert (rows["J"]["lr"], rows["J"]["beta1"], rows["J"]["beta2"]) == (
        pytest.approx(4e-4),
        0.9,
        pytest.approx(0.95),
    )


def test_signature_ignores_intervals_but_not_hyperparameters(tmp_path):
    sig = lambda extra: _plan(["+experiment=sqrt_rule", *extra], ["A"], tmp_path).arms[0].signature  # noqa: E731
    base = sig([])
    assert sig(["trainer.val_every_tokens=8192", "trainer.checkpoint_every_tokens=8192"]) == base
    assert sig(["trainer.micro_batch_size=16"]) == base
    assert sig(["ops.base.lr=0.003"]) != base
    assert sig(["experiment.token_budget=2097152"]) != base
    other_root = _plan(["+experiment=sqrt_rule"], ["A"], tmp_path / "elsewhere").arms[0].signature
    assert other_root == base  # paths are not identity
    run_dir = _plan(["+experiment=sqrt_rule"], ["A"], tmp_path).arms[0].run_dir
    assert run_dir == tmp_path / "sqrt_rule" / "runs" / f"A-{base}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ops.base.beta2=1.0"], "beta2=1.0, outside"),
        (["trainer.micro_batch_size=3"], "not divisible by micro-batch 3"),
        (["resources.tasks_per_node=3"], "not divisible by world size 3"),
        (["experiment.token_budget=1000"], "not a positive multiple"),
        (["experiment.arms.J.from_arm=J"], "cycle"),
        (["experiment.arms.H.rule=nope"], "rule 'nope' is not one of"),
        (["trainer.val_samples=0"], "at least one validation sequence"),
        (["trainer.seq_len=4096"], "exceeds model.max_position_embeddings"),
    ],
)
def test_invalid_arms_are_refused_before_anything_runs(overrides, message, tmp_path):
    with pytest.raises(PlanError, match=message):
        _plan(["+experiment=sqrt_rule", *overrides], ["A", "H", "B", "J"], tmp_path)
    assert not (tmp_path / "sqrt_rule").exists()


def test_cli_reports_refusal_clearly(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweep",
            "+experiment=sqrt_rule",
            "-m",
            "ops.base.beta1=1.5",
            f"sweep.root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "the sweep cannot run" in out.stderr + out.stdout and "beta1=" in out.stderr + out.stdout
    assert not (tmp_path / "sqrt_rule" / "runs").exists()


def test_typo_in_config_fails_at_compose_time():
    with pytest.raises(Exception, match="learning_rate"):
        compose(["+experiment=sqrt_rule", "ops.base.learning_rate=1"])


def test_fast_composition_of_sweep_jobs_equals_full_composition(tmp_path):
    """The launcher sets plain value overrides on the first job's config instead of recomposing:
    every arm must come out exactly as a full Hydra composition makes it."""
    large = "ops.base.reference_batch=16"  # room for ratios up to 16
    sweep = ["arm=H", "experiment.ratio=2,4,8,16", "rules.sqrt.keep_eps=true,false", "model=tiny", large]
    cmd = [*DRY_RUN, f"sweep.root={tmp_path}"]
    out = subprocess.run([*cmd, *sweep], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    planned = {r["signature"]: r for r in json.loads((tmp_path / "sqrt_rule" / "plan.json").read_text())}
    assert len(planned) == 8
    for ratio in (2, 4, 8, 16):
        for keep in ("true", "false"):
            job = ["+experiment=sqrt_rule", large, f"experiment.ratio={ratio}", f"rules.sqrt.keep_eps={keep}"]
            full = _plan(job, ["H"], tmp_path).arms[0]
            assert planned[full.signature]["eps"] == full.row["eps"]
            assert planned[full.signature]["batch_size"] == 16 // ratio


def test_a_ratio_sweep_runs_an_arm_both_ratios_share_once(tmp_path):
    """experiment.ratio=4,16: A is the same run at both ratios; it is planned once and kept under
    both names, where the old planner refused it as "the same run"."""
    base = ["+experiment=sqrt_rule", f"sweep.root={tmp_path}", "ops.base.reference_batch=16"]
    jobs = [[*base, f"experiment.ratio={r}", f"arm={a}"] for r in (4, 16) for a in "AH"]
    plan = build_plan([compose(j) for j in jobs], jobs)
    names = [j.name for j in plan.arms]
    assert names == ["A[experiment.ratio=4]", "H[experiment.ratio=4]", "H[experiment.ratio=16]"]
    (alias,) = plan.aliases
    assert alias.name == "A[experiment.ratio=16]" and alias.row["same_as"] == "A[experiment.ratio=4]"
    assert alias.signature == plan.arms[0].signature and alias.row["variant"] == "experiment.ratio=16"


def test_the_invariant_adam_warmup_takes_its_batch_whole(tmp_path):
    plan = _plan(["+experiment=invariant_adam"], ["V16"], tmp_path)
    warmup, arm = (j.stage.run for j in plan.jobs if j.stage.run is not None)
    assert (warmup.trainer.micro_batch_size, arm.trainer.micro_batch_size) == (64, 1)


def test_token_budgets_read_as_powers_of_two(tmp_path):
    from sweep.plan import arm_table

    table = arm_table(_plan(["+experiment=sqrt_rule"], ["A"], tmp_path))
    assert "2^20 (1.05M)" in table and "2^18 (262k)" in table and "1048576" not in table


def test_budgets_the_prepared_data_cannot_hold_are_refused_at_plan_time(prepared_data, tmp_path):
    """Once the data is prepared, what the trainer would refuse (a split too small for the budget)
    is refused before anything is queued."""
    meta = json.loads((prepared_data / "meta.json").read_text())["config"]
    data = [
        f"data.source={meta['source']}",
        f"data.path={meta['path']}",
        f"data.tokenizer.vocab_size={meta['tokenizer']['vocab_size']}",
        *(f"data.splits.{k}={v}" for k, v in meta["splits"].items()),
        f"data.cache_dir={prepared_data.parent}",
        "model.vocab_size=320",
        "experiment.warmup.token_budget=1048576",
    ]
    with pytest.raises(PlanError, match=r"warmup: the run reads 8192 sequences .* split 'warmup' holds \d+"):
        _plan(["+experiment=sqrt_rule", *data], ["A"], tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_analysis_composes_every_preset(experiment):
    """`python -m analysis +experiment=NAME` composes the preset's file (its defaults list builds on
    the study's operating point) and reads its name and pairs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from analysis.schema import register

    register()  # the analysis's typed nodes, as `python -m analysis` registers them
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="analysis", overrides=[f"+experiment={experiment}"])
    assert cfg.experiment.name == experiment and cfg.experiment.pairs
    assert cfg.analysis.segments == 4 and cfg.wandb.workers == 8  # the schema's defaults


def test_the_prepare_job_asks_slurm_for_cpus_and_the_arms_for_gpus(tmp_path):
    from sweep.slurm_backend import slurm_parameters

    plan = _plan(["+experiment=sqrt_rule", "study=seed", "resources.prepare_cpus=32"], ["A"], tmp_path)
    jobs = {j.kind: j for j in plan.jobs}
    prepare, arm = (slurm_parameters(plan, jobs[k]) for k in ("prepare", "arm"))
    assert "gpus_per_node" not in prepare and (prepare["ntasks_per_node"], prepare["cpus_per_task"]) == (
        1,
        32,
    )
    assert (arm["gpus_per_node"], arm["ntasks_per_node"], arm["cpus_per_task"]) == (8, 8, 8)


def test_a_rerun_that_redoes_the_warmup_is_refused_where_it_would_break_a_pair(tmp_path, monkeypatch):
    """The sweep recorded A, H, D from one warmup; rerunning A alone with a config that changes the
    warmup (ops.base.lr) would leave A-H and A-D comparing runs from different weights: refused,
    naming both. Rerunning A with H (and D) is fine; status marks an arm left on the old warmup."""
    from records.manifest import read_manifest
    from sweep import status
    from sweep.launch import branch_conflicts
    from sweep.manifest import record_plan

    record_plan(_plan(["+experiment=sqrt_rule"], ["A", "H", "D"], tmp_path))
    changed = ["+experiment=sqrt_rule", "ops.base.lr=0.004"]
    alone = branch_conflicts(_plan(changed, ["A"], tmp_path))
    assert len(alone) == 2 and all(m.startswith("A would start from warmup:") for m in alone)
    assert "but H (pair A-H) started from warmup:" in alone[0] and "(pair A-D)" in alone[1]
    assert branch_conflicts(_plan(changed, ["A", "H", "D"], tmp_path)) == []
    record_plan(_plan(changed, ["A", "H"], tmp_path))  # D stays on the old warmup
    manifest = read_manifest(tmp_path / "sqrt_rule")
    monkeypatch.setattr(status, "squeue_states", lambda: None)
    notes = {row["job"]: row["note"] for row in status.sweep_rows(tmp_path / "sqrt_rule")}
    assert "started from an older warmup" in notes["D"] and "older warmup" not in notes["H"]
    assert manifest["jobs"]["D"]["derived"]["branch"] != manifest["jobs"]["H"]["derived"]["branch"]
