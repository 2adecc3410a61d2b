"""From composed configs to a plan: the jobs of a sweep, their signatures, and the arm table.

Every check that can fail is made here, before anything is queued: unknown ops or rules, a rule
that gives beta >= 1, two arms that would be the same run, and every check of the run configs
themselves (`RunConfig.validate`, which the trainer makes again: batches that do not split over
ranks and micro-batches, budgets that are not a whole number of steps, unknown optimizers...).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tabulate import tabulate

from sweep.identity import DEFAULT_SPLIT, run_signature
from sweep.schema import ArmSpec, Config, ResourcesConfig
from sweep.stage import StageJob
from train.branch_point import BranchPoint, read_branch_point, shape_problem
from train.config import DataConfig, InvalidRun, OptimizerConfig, RunConfig, Steps, StopRule
from train.data import data_dir_for, data_problems, data_signature, prepared_problems
from train.rules import OperatingPoint, RuleError, apply_rule, half_life, weight_decay_timescale
from train.schedule import ScheduleConfig


class PlanError(ValueError):
    """The sweep cannot run as configured; `problems` lists every problem found."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass
class Job:
    """One unit of work of a sweep: tokenizing the data, the warmup, or an arm."""

    name: str
    kind: str  # prepare | warmup | arm
    signature: str
    run_dir: Path  # for prepare, the prepared data dir
    stage: StageJob
    depends_on: list[str] = field(default_factory=list)  # names of jobs that must complete first
    overrides: list[str] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)  # the arm table's row


@dataclass
class SweepPlan:
    name: str
    dir: Path
    jobs: list[Job]  # dependencies before dependants
    pairs: list[list[str]]
    resources: ResourcesConfig
    ops: dict[str, OperatingPoint] = field(default_factory=dict)
    dry_run: bool = False
    experiment_arms: list[str] = field(default_factory=list)  # every arm the experiment defines
    aliases: list[Job] = field(default_factory=list)  # same runs as planned arms, under their own names
    cbs: dict[str, Any] = field(default_factory=dict)  # the experiment's batch ladder (analysis/cbs.py)
    skip_tokens: int = 0  # the experiment's branch transient: the analysis's default skip
    controls: list[list[str]] = field(default_factory=list)  # pairs that must not match
    yardstick: list[list[str]] = field(default_factory=list)  # the pairs whose spread sets the margin
    # the sequential verdict's options (experiment.decide and the budget); {}: arms run their budget
    decide: dict[str, Any] = field(default_factory=dict)
    lr_ladders: dict[str, list[str]] = field(default_factory=dict)  # by variant: its arms at several lrs

    @property
    def arms(self) -> list[Job]:
        return [j for j in self.jobs if j.kind == "arm"]


def _derive(name: str, cfg: Config, chain: tuple[str, ...] = ()) -> OperatingPoint:
    exp = cfg.experiment
    if name not in exp.arms:
        raise PlanError(f"unknown arm {name!r}; the experiment defines {', '.join(exp.arms) or 'none'}")
    if name in chain:
        raise PlanError(f"arms {' -> '.join((*chain, name))} derive from each other in a cycle")
    spec: ArmSpec = exp.arms[name]
    where = f"its base arm {name}: " if chain else ""  # the planner names the arm being planned
    if spec.from_arm:
        base = _derive(spec.from_arm, cfg, (*chain, name))
    elif spec.op in cfg.ops:
        base = cfg.ops[spec.op]
    else:
        raise PlanError(f"{where}op {spec.op!r} is not one of the experiment's ops ({', '.join(cfg.ops)})")
    if spec.rule not in cfg.rules:
        raise PlanError(
            f"{where}rule {spec.rule!r} is not one of the experiment's rules ({', '.join(cfg.rules)})"
        )
    try:
        return apply_rule(base, cfg.rules[spec.rule], spec.batch_size)
    except RuleError as exc:
        raise PlanError(f"{where}{exc}") from exc


def _run_config(
    cfg: Config,
    name: str,
    kind: str,
    point: OperatingPoint,
    batch_size: int,
    budget: int,
    init: Job | None,
    run_root: Path,
    spec: ArmSpec | None = None,
    branch: BranchPoint | None = None,
) -> tuple[RunConfig, Steps]:
    """The run of one job, checked and named; `spec` (arms only) adds its optimizer, precision,
    schedule and lr scale. Raises PlanError with every problem of the run."""
    spec = spec or ArmSpec(batch_size=batch_size)
    lr_scale = cfg.experiment.lr_scale if kind == "arm" else 1.0  # every arm's lr; never the warmup's
    schedule = (
        ScheduleConfig()  # the warmup is a plain constant-lr run
        if kind == "warmup"
        else replace(cfg.experiment.schedule, kind=spec.schedule or cfg.experiment.schedule.kind)
    )
    run = RunConfig(
        name=name,
        stage=kind,
        signature="",
        run_dir="",
        data_dir=str(data_dir_for(cfg.data)),
        model=cfg.model,
        optimizer=OptimizerConfig(
            **{**point.hyperparameters(), "lr": point.lr * spec.lr_scale * lr_scale}, name=spec.optimizer
        ),
        batch_size=batch_size,
        token_budget=budget,
        # Carrying the optimizer state needs a branch point to carry it from.
        trainer=replace(
            cfg.trainer,
            carry_optimizer=cfg.trainer.carry_optimizer and (init is not None or branch is not None),
        ),
        split=DEFAULT_SPLIT[kind],
        lr_warmup_tokens=(
            cfg.experiment.warmup.lr_warmup_tokens if kind == "warmup" else cfg.experiment.rewarmup_tokens
        ),
        schedule=schedule,
        precision=spec.precision or cfg.precision.dtype,
        init_checkpoint=str(init.run_dir) if init else (branch.path if branch else ""),
        sweep_name=cfg.experiment.name,
        wandb=cfg.wandb,
    )
    try:
        steps = run.validate(cfg.resources.world_size)
    except InvalidRun as exc:
        raise PlanError(*exc.problems) from exc
    samples = steps.layout.tokens_after(steps.layout.steps - 1) // run.trainer.seq_len
    problems = prepared_problems(run.data_dir, run.model.vocab_size, run.split, run.trainer.seq_len, samples)
    if problems:  # the data is prepared already: what the trainer would refuse, refused now
        raise PlanError(*problems)
    # The micro-batch the first batch really uses (0 or more than the per-rank batch: all of it).
    run.trainer.micro_batch_size = steps.plans[batch_size].micro_batch_size
    run.signature = run_signature(
        run, data_signature(cfg.data), init.signature if init else None, branch.content if branch else None
    )
    run.run_dir = str(run_root / f"{name}-{run.signature}")
    return run, steps


def _row(
    job_name: str, op: str, rule: str, run: RunConfig, steps: Steps, base: str, variant: list[str]
) -> dict[str, Any]:
    """The arm table's row of a job. `base` is the name pairs use; `variant` the overrides the
    sweep varies for it, split into its data-order replicate (seeds) and the rest."""
    replicate = _replicate_overrides(variant)
    batch = steps.plans[run.batch_size]
    setup = [run.optimizer.name] if run.optimizer.name != "adamw" else []
    setup += [run.schedule.kind] if run.schedule.kind != "constant" else []
    setup += [run.precision] if run.precision != "fp32" else []
    return {
        "arm": job_name,
        "op": op,
        "rule": rule,
        "batch_size": run.batch_size,
        "seq_len": run.trainer.seq_len,
        "batch_tokens": batch.tokens_per_step,
        "micro_batch_size": batch.micro_batch_size,
        "grad_accum": batch.grad_accum,
        "lr": run.optimizer.lr,
        "beta1": run.optimizer.beta1,
        "beta2": run.optimizer.beta2,
        "eps": run.optimizer.eps,
        "wd": run.optimizer.weight_decay,
        "tau": tokens_text(
            weight_decay_timescale(run.optimizer.lr, run.optimizer.weight_decay, batch.tokens_per_step)
        ),
        "b2_half": tokens_text(half_life(run.optimizer.beta2, batch.tokens_per_step)),
        "token_budget": run.token_budget,
        "steps": steps.layout.steps,
        "flops": run.token_budget
        * run.model.flops_per_token(run.trainer.seq_len),  # the job's training compute
        "setup": ",".join(setup) or "-",
        "signature": run.signature,
        "base": base,
        "variant": ",".join(o for o in variant if o not in replicate),
        "replicate": ",".join(o.lstrip("+~").split(".", 1)[1] for o in replicate),
    }


class Problems:
    """Every problem of a sweep, collected so that the user fixes them all in one go; one problem
    shared by several arms (a trainer setting, say) is listed once, with the arms it hits."""

    def __init__(self) -> None:
        self._by_message: dict[str, list[str]] = {}

    def add(self, message: str, arm: str = "") -> None:
        arms = self._by_message.setdefault(message, [])
        if arm and arm not in arms:
            arms.append(arm)

    def raise_any(self) -> None:
        if not self._by_message:
            return
        lines = []
        for message, subjects in self._by_message.items():
            warmups = [s for s in subjects if s.startswith("warmup")]
            arms = [s for s in subjects if s not in warmups]
            names = warmups + ([f"{'arm' if len(arms) == 1 else 'arms'} {', '.join(arms)}"] if arms else [])
            lines.append(f"  - {' and '.join(names)}: {message}" if names else f"  - {message}")
        raise PlanError("the sweep cannot run:\n" + "\n".join(lines))


def build_plan(configs: list[Config], overrides: list[list[str]]) -> SweepPlan:
    """The jobs of a sweep over `configs` (one per Hydra job), deduplicated and checked.

    Raises PlanError listing every problem, so a user fixes them all in one go.
    """
    if not configs:
        raise PlanError("nothing to run: the sweep has no jobs")
    first = configs[0]
    where = sweep_dir_problems(first.sweep.root, first.sweep.dir)
    if where:
        raise PlanError("the sweep cannot run:\n" + "\n".join(f"  - {p}" for p in where))
    planner = _Planner(Path(first.sweep.dir).absolute())
    # Overrides shared by every job (+experiment=..., model=...) are the sweep's; the others name variants.
    common = set.intersection(*(set(o) for o in overrides))
    for cfg, job_overrides in zip(configs, overrides, strict=True):
        cfg.data = replace(cfg.data, cache_dir=str(Path(cfg.data.cache_dir).absolute()))
        if cfg.experiment.name != first.experiment.name or Path(cfg.sweep.dir).absolute() != planner.dir:
            planner.problems.add("all jobs of one sweep must share experiment.name and sweep.dir")
        elif not cfg.arm:
            planner.problems.add(f"job {' '.join(job_overrides)}: no arm chosen (set arm=NAME)")
        else:
            variant = [o for o in job_overrides if o not in common and not o.startswith("arm=")]
            planner.add(cfg, job_overrides, variant)
    for problem in [*declared_pair_problems(first), *decide_problems(first)]:
        planner.problems.add(problem)
    for job in planner.jobs.values():
        if job.kind == "arm" and job.stage.run is not None:
            problem = transient_problem(job.stage.run.token_budget, first.experiment.skip_tokens)
            if problem:
                planner.problems.add(problem, job.name)
    planner.problems.raise_any()
    exp = first.experiment
    jobs = list(planner.jobs.values())
    return SweepPlan(
        exp.name,
        planner.dir,
        jobs,
        exp.pairs,
        first.resources,
        first.ops,
        first.sweep.dry_run,
        list(exp.arms),
        list(planner.aliases.values()),
        asdict(exp.cbs) if exp.cbs.ladder else {},
        exp.skip_tokens,
        [list(p) for p in exp.controls],
        [list(p) for p in exp.yardstick],
        {**asdict(exp.decide), "budget": exp.token_budget} if exp.stop_when_decided else {},
        {k: list(v) for k, v in exp.lr_ladders.items()},
    )


def transient_problem(budget: int, skip_tokens: int) -> str:
    """An arm that ends within the experiment's branch transient, which the analysis leaves out,
    would have no sample to compare: refused before any GPU-hour is spent (the override named
    changes no arm's signature)."""
    if budget > skip_tokens:
        return ""
    return (
        f"a budget of {budget} tokens ends within the branch transient the analysis leaves out "
        f"(experiment.skip_tokens={skip_tokens}): no sample to compare; raise "
        f"experiment.token_budget past {skip_tokens} or lower experiment.skip_tokens"
    )


def declared_pair_problems(cfg: Config) -> list[str]:
    """What is wrong with the experiment's pairs, controls and yardstick: each names two arms of
    the experiment; a yardstick pair is two arms at one batch size, neither of them a control
    (an arm only in controls), and no control pair. The margin must not depend on a control."""
    exp = cfg.experiment
    arms = ", ".join(exp.arms)
    problems = []
    for key in ("pairs", "controls", "yardstick"):
        for pair in getattr(exp, key):
            if len(pair) != 2 or pair[0] == pair[1] or any(a not in exp.arms for a in pair):
                problems.append(
                    f"experiment.{key}: {list(pair)} must name two different arms of the experiment ({arms})"
                )
    for ladder, names in exp.lr_ladders.items():
        if not names or any(a not in exp.arms for a in names):
            problems.append(
                f"experiment.lr_ladders.{ladder}: {list(names)} must name arms of the experiment ({arms})"
            )
    in_pairs = {a for p in exp.pairs for a in p}
    control_arms = {a for p in exp.controls for a in p} - in_pairs
    for pair in exp.yardstick:
        if len(pair) != 2 or any(a not in exp.arms for a in pair):
            continue
        batches = [exp.arms[a].batch_size for a in pair]
        if batches[0] != batches[1]:
            problems.append(
                f"experiment.yardstick: {pair[0]} (batch {batches[0]}) and {pair[1]} (batch {batches[1]}) "
                "are at different batch sizes: a yardstick pair is two operating points at one batch size"
            )
        controls = sorted(control_arms & set(pair))
        if list(pair) in [list(c) for c in exp.controls] or controls:
            what = f"the control arm(s) {', '.join(controls)}" if controls else "a control pair"
            problems.append(
                f"experiment.yardstick: {list(pair)} uses {what}: a control must never set the margin"
            )
    return problems


def decide_problems(cfg: Config) -> list[str]:
    """What is wrong with `experiment.stop_when_decided` and its `experiment.decide` options."""
    exp = cfg.experiment
    if not exp.stop_when_decided:
        return []
    d = exp.decide
    checks = [
        ("looks", d.looks, d.looks >= 1, "at least 1 look"),
        (
            "equivalent_from",
            d.equivalent_from,
            0 <= d.equivalent_from <= 1,
            "a share of the budget in [0, 1]",
        ),
        ("segments", d.segments, d.segments >= 1, "at least 1 segment"),
        ("alpha", d.alpha, 0 < d.alpha < 0.5, "a level in (0, 0.5)"),
        ("margin", d.margin, d.margin >= 0, "0 (a fraction of the yardstick) or more nats"),
        ("margin_fraction", d.margin_fraction, d.margin_fraction > 0, "a positive fraction"),
        ("poll_s", d.poll_s, d.poll_s >= 0, "0 or more seconds"),
    ]
    problems = [
        f"experiment.decide.{key}={value}: expected {what}" for key, value, ok, what in checks if not ok
    ]
    problems += [
        f"experiment.decide.keep: {a} is not an arm of the experiment" for a in d.keep if a not in exp.arms
    ]
    if not exp.pairs and not exp.controls:
        problems.append(
            "experiment.stop_when_decided=true: the experiment declares no pairs, so nothing is decided"
        )
    if not d.margin and not exp.yardstick:
        problems.append(
            "experiment.stop_when_decided=true needs a margin: declare experiment.yardstick or set "
            "experiment.decide.margin (nats)"
        )
    return problems


def stop_rule(cfg: Config, arm: str, sweep_dir: Path) -> StopRule:
    """How arm `arm` stops itself: at the sequential verdict's looks when the sweep stops decided
    arms and the arm is in a declared pair or the yardstick (and not kept, nor on a batch ladder,
    whose analysis needs every arm's whole curve); else never (StopRule())."""
    exp, d = cfg.experiment, cfg.experiment.decide
    judged = {a for p in [*exp.pairs, *exp.controls, *exp.yardstick] for a in p}
    if not exp.stop_when_decided or arm not in judged or arm in d.keep or arm in exp.cbs.ladder:
        return StopRule()
    return StopRule(str(sweep_dir), d.poll_s)


# Overrides that make data-order replicates: arms differing only in these are one arm, run again.
REPLICATE_KEYS = ("trainer.data_seed", "trainer.init_seed")


def _replicate_overrides(variant: list[str]) -> list[str]:
    return [o for o in variant if o.lstrip("+~").split("=", 1)[0] in REPLICATE_KEYS]


def _warmup_overrides(variant: list[str]) -> list[str]:
    """The variant's overrides that make its warmup: its data order, and the warmup's own settings
    (`experiment.warmup.token_budget=...` sweeps the branch point: one warmup per length)."""
    own = [o for o in variant if o.lstrip("+~").startswith("experiment.warmup.")]
    return _replicate_overrides(variant) + own


class _Planner:
    """The jobs planned so far (prepare, warmups, arms: dependencies first) and the problems found."""

    def __init__(self, sweep_dir: Path) -> None:
        self.dir = sweep_dir
        self.jobs: dict[str, Job] = {}
        self.problems = Problems()
        self._arm_by_signature: dict[str, str] = {}
        self.aliases: dict[str, Job] = {}  # a job that is the same run as a planned one: not run twice
        runs = sweep_dir / "runs"
        # Run dirs already on disk by signature: a run made under another name (an arm first swept
        # alone, then as replicate 0 of several) is the same run and continues where it is.
        self._on_disk = {p.name.rsplit("-", 1)[-1]: p for p in runs.iterdir()} if runs.is_dir() else {}
        self.branch_points: dict[str, BranchPoint] = {}  # experiment.branch_from, by path

    def add(self, cfg: Config, overrides: list[str], variant: list[str]) -> None:
        """The arm of `cfg` and the stages it needs (tokenizing, its data order's warmup)."""
        assert cfg.arm is not None
        arm_name = cfg.arm
        try:  # model.hf_config: the shape of its config.json, from here on
            cfg = replace(cfg, model=cfg.model.resolved())
        except ValueError as exc:
            self.problems.add(str(exc))
            return
        data = data_problems(cfg.data, cfg.model.vocab_size)
        for problem in data:
            self.problems.add(problem)
        if data:
            return
        prepare = self.jobs.setdefault("prepare", _prepare_job(cfg.data))
        init: Job | None = None
        branch: BranchPoint | None = None
        if cfg.experiment.branch_from:  # the researcher's weights: no warmup runs
            problems = self._branch_problems(cfg)
            for problem in problems:
                self.problems.add(problem)
            if problems:
                return
            branch = self.branch_points[cfg.experiment.branch_from]
        elif cfg.experiment.warmup.enabled:
            try:
                init = self._reuse(
                    _warmup_job(cfg, self.dir / "runs", prepare.name, _warmup_overrides(variant))
                )
            except PlanError as exc:
                for problem in exc.problems:
                    self.problems.add(problem, "warmup")
                init = None  # the arm is still checked, so that every problem is listed at once
            if init is not None and self.jobs.setdefault(init.name, init).signature != init.signature:
                self.problems.add("jobs of this sweep need different warmups: sweep one warmup at a time")
                return
        try:
            arm = _arm_job(cfg, overrides, variant, self.dir / "runs", init, [(init or prepare).name], branch)
        except PlanError as exc:
            for problem in exc.problems:
                self.problems.add(problem, arm_name)
            return
        arm = self._reuse(arm)
        if arm.name in self.jobs:
            self.problems.add(
                f"arm name {arm.name!r} appears twice in the sweep: sweep it alone, or name variants"
            )
        elif arm.signature in self._arm_by_signature:  # e.g. A at experiment.ratio=4 and =16
            twin = self._arm_by_signature[arm.signature]
            self.aliases[arm.name] = replace(arm, depends_on=[], row={**arm.row, "same_as": twin})
        else:
            self.jobs[arm.name] = arm
            self._arm_by_signature[arm.signature] = arm.name

    def _branch_problems(self, cfg: Config) -> list[str]:
        """What stops every arm from branching from experiment.branch_from (read once per path)."""
        path = cfg.experiment.branch_from
        if path not in self.branch_points:
            try:
                self.branch_points[path] = read_branch_point(path)
            except ValueError as exc:
                return [str(exc)]
        point = self.branch_points[path]
        problems = [p for p in [shape_problem(point, asdict(cfg.model))] if p]
        if cfg.trainer.carry_optimizer and not point.has_optimizer:
            problems.append(
                f"trainer.carry_optimizer=true: experiment.branch_from={path!r} holds no optimizer "
                "state (a save_pretrained directory; only a run of this project carries Adam's moments)"
            )
        return problems

    def _reuse(self, job: Job) -> Job:
        """`job`, in the run dir its signature already has on disk, if any."""
        existing = self._on_disk.get(job.signature)
        if existing is not None and existing != job.run_dir and job.stage.run is not None:
            job.run_dir = existing
            job.stage.run.run_dir = str(existing)
        return job


def sweep_dir_problems(root: str, sweep_dir: str) -> list[str]:
    """Where a sweep may not write: an empty root or dir (the working directory, or /), a file, a
    place nobody may write to."""
    if not str(root).strip() or not str(sweep_dir).strip():
        return [
            f"sweep.root={root!r}, sweep.dir={sweep_dir!r}: give a directory (default: sweeps/<experiment>)"
        ]
    path = Path(sweep_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"sweep.dir={sweep_dir!r}: {existing} is a file, not a directory"]
    try:  # permissions alone do not say it (root, read-only mounts, /proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".bss-probe-", dir=existing))
    except OSError as exc:
        return [f"sweep.dir={sweep_dir!r}: cannot create anything in {existing} ({exc.strerror})"]
    return []


def _prepare_job(data: DataConfig) -> Job:
    return Job(
        "prepare",
        "prepare",
        data_signature(data),
        data_dir_for(data),
        StageJob("prepare", data=data, max_requeues=0),
    )


def _warmup_job(cfg: Config, run_root: Path, prepare: str, replicate: list[str]) -> Job:
    """The throwaway warmup of the data order (and warmup settings) `replicate` selects: one each."""
    spec = cfg.experiment.warmup
    if spec.op not in cfg.ops:
        raise PlanError(f"op {spec.op!r} is not one of the experiment's ops ({', '.join(cfg.ops)})")
    name = "warmup" if not replicate else f"warmup[{','.join(replicate)}]"
    if spec.micro_batch_size is not None:
        cfg = replace(cfg, trainer=replace(cfg.trainer, micro_batch_size=spec.micro_batch_size))
    run, steps = _run_config(
        cfg, name, "warmup", cfg.ops[spec.op], spec.batch_size, spec.token_budget, None, run_root
    )
    return Job(
        name,
        "warmup",
        run.signature,
        Path(run.run_dir),
        StageJob("train", run=run, max_requeues=cfg.resources.max_requeues),
        [prepare],
        [],
        _row(name, spec.op, "none", run, steps, "warmup", replicate),
    )


def _arm_job(
    cfg: Config,
    overrides: list[str],
    variant: list[str],
    run_root: Path,
    init: Job | None,
    deps: list[str],
    branch: BranchPoint | None = None,
) -> Job:
    assert cfg.arm is not None
    point = _derive(cfg.arm, cfg)
    spec = cfg.experiment.arms[cfg.arm]
    budget = spec.token_budget or cfg.experiment.token_budget
    # Sweeping other keys than `arm` (e.g. trainer.init_seed=0,1) makes variants of one arm.
    name = cfg.arm if not variant else f"{cfg.arm}[{','.join(variant)}]"
    run, steps = _run_config(
        cfg, name, "arm", point, point.reference_batch, budget, init, run_root, spec, branch
    )
    run.tags = [f"op:{spec.op or 'arm:' + spec.from_arm}", f"rule:{spec.rule}"]
    run.stop = stop_rule(cfg, cfg.arm, run_root.parent)
    op = spec.op or f"arm {spec.from_arm}"
    row = _row(name, op, spec.rule, run, steps, cfg.arm, variant)
    # The weights it starts from: arms compared in a pair must share them (analysis/pairs.py).
    row["branch"] = f"warmup:{init.signature}" if init else f"init_seed:{run.trainer.init_seed}"
    if branch is not None:
        row["branch"] = f"checkpoint:{branch.content[:16]}"
        if math.isfinite(branch.tokens):
            row["branch_tokens"] = branch.tokens
    run.extra_config = {"arm": row, "experiment": cfg.experiment.name, "overrides": overrides}
    return Job(
        name,
        "arm",
        run.signature,
        Path(run.run_dir),
        StageJob("train", run=run, max_requeues=cfg.resources.max_requeues),
        deps,
        overrides,
        row,
    )


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An aligned text table (tabulate's `simple`); floats in 6 significant digits where they are of
    ordinary size, 4 otherwise (enough to tell 2.5e-05 from 2.6e-05)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.6g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    return tabulate(cells, headers=columns, tablefmt="simple", disable_numparse=True, stralign="left")


def tokens_text(n: int | float | None) -> str:
    """A token count for people: 1.05M, 262k, 1.07B (inf for none)."""
    if n is None:
        return ""
    if n == math.inf:
        return "inf"
    n = int(n)
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def budget_text(n: int) -> str:
    """A token budget: 2^20 (1.05M) for a power of two, else as tokens_text."""
    return f"2^{n.bit_length() - 1} ({tokens_text(n)})" if n >= 1024 and n & (n - 1) == 0 else tokens_text(n)


ARM_COLUMNS = ["arm", "op", "rule", "batch_size", "batch_tokens", "micro_batch_size", "grad_accum", "lr"]
ARM_COLUMNS += [
    "beta1",
    "beta2",
    "eps",
    "wd",
    "tau",
    "b2_half",
    "token_budget",
    "steps",
    "setup",
    "signature",
]
# micro_batch_size: sequences per rank per forward-backward; grad_accum: how many of them a step adds
# tau: AdamW's weight-decay timescale 1 / (lr wd) in tokens; b2_half: beta2's half-life in tokens


def gpu_hours(flops: float, res: ResourcesConfig) -> float:
    """GPU-hours of `flops` of training at the assumed MFU (the FLOP count is PaLM's convention,
    as the trainer's MFU): an estimate for the allocation request, whatever the number of GPUs."""
    return flops / (res.gpu_peak_tflops * 1e12 * res.assumed_mfu * 3600)


def arm_table(plan: SweepPlan) -> str:
    """The arm table printed before anything runs (token budgets for people; plan.json has the numbers)."""
    rows = [{**j.row, "token_budget": budget_text(j.row["token_budget"])} for j in plan.jobs if j.row]
    notes = [
        f"{a.name}: the same run as {a.row['same_as']} (signature {a.signature}): run once, shown under both"
        for a in plan.aliases
    ]
    if plan.decide:
        stops = [j.name for j in plan.arms if j.stage.run is not None and j.stage.run.stop.sweep_dir]
        runs_on = [j.name for j in plan.arms if j.name not in stops]
        notes.append(
            f"stop_when_decided: {', '.join(stops) or 'no arm'} stop once their pairs are decided "
            f"({plan.decide['looks']} looks)"
            + (f"; {', '.join(runs_on)} run their budget (in no declared pair, or kept)" if runs_on else "")
        )
    res = plan.resources
    if not res.gpus_per_node:
        return "\n".join([format_table(rows, ARM_COLUMNS), *notes])
    for row in rows:
        row["gpu_hours"] = round(gpu_hours(row["flops"], res), 1)
    total = sum(gpu_hours(j.row["flops"], res) for j in plan.jobs if j.row)
    ranks = f"{res.world_size} ranks ({res.nodes} node{'s' * (res.nodes > 1)} x {res.gpus_per_node} GPUs)"
    estimate = (
        f"compute: {total:,.0f} GPU-hours in all on {ranks}, at an assumed MFU of {res.assumed_mfu:.0%} of "
        f"{res.gpu_peak_tflops:g} TFLOP/s per GPU (resources.assumed_mfu, resources.gpu_peak_tflops)"
    )
    return "\n".join([format_table(rows, [*ARM_COLUMNS, "gpu_hours"]), *notes, estimate])
