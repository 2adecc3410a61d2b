"""From composed configs to a plan: the jobs of a sweep, their signatures, and the arm table.

Every check that can fail is made here, before anything is queued: unknown ops or rules, a rule
that gives beta >= 1, a batch that does not split over ranks and micro-batches, a budget that is
not a whole number of steps, two arms that would be the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from slurm.job import StageJob
from sweep.schema import ArmSpec, Config, ResourcesConfig
from train.batching import BatchError, BatchPlan, plan_batches
from train.config import OPTIMIZERS, DataConfig, OptimizerConfig, RunConfig
from train.data import data_dir_for, data_signature
from train.rules import OperatingPoint, RuleError, apply_rule
from train.schedule import ScheduleConfig, ScheduleError, layout


class PlanError(ValueError):
    """The sweep cannot run as configured; the message lists every problem found."""


def signature(content: dict[str, Any]) -> str:
    """Short hash of a run's result-affecting content (canonical JSON)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
    if spec.from_arm:
        base = _derive(spec.from_arm, cfg, (*chain, name))
    elif spec.op in cfg.ops:
        base = cfg.ops[spec.op]
    else:
        raise PlanError(
            f"arm {name}: op {spec.op!r} is not one of the experiment's ops ({', '.join(cfg.ops)})"
        )
    if spec.rule not in cfg.rules:
        raise PlanError(
            f"arm {name}: rule {spec.rule!r} is not one of the experiment's rules ({', '.join(cfg.rules)})"
        )
    try:
        return apply_rule(base, cfg.rules[spec.rule], spec.batch_size)
    except RuleError as exc:
        raise PlanError(f"arm {name}: {exc}") from exc


def _run_config(
    cfg: Config,
    name: str,
    kind: str,
    point: OperatingPoint,
    batch: BatchPlan,
    budget: int,
    init: Job | None,
    run_root: Path,
    spec: ArmSpec | None = None,
) -> RunConfig:
    """The run of one job; `spec` (arms only) adds its optimizer, precision, schedule and lr scale."""
    data_dir = data_dir_for(cfg.data)
    spec = spec or ArmSpec(batch_size=batch.batch_size)
    precision = spec.precision or cfg.precision.dtype
    schedule = (
        ScheduleConfig()  # the warmup is a plain constant-lr run
        if kind == "warmup"
        else replace(cfg.experiment.schedule, kind=spec.schedule or cfg.experiment.schedule.kind)
    )
    optimizer = OptimizerConfig(
        name=spec.optimizer,
        lr=point.lr * spec.lr_scale,
        beta1=point.beta1,
        beta2=point.beta2,
        eps=point.eps,
        weight_decay=point.weight_decay,
        grad_clip=cfg.trainer.grad_clip,
    )
    lr_warmup = cfg.experiment.warmup.lr_warmup_tokens if kind == "warmup" else 0
    identity = {
        "kind": kind,
        "model": asdict(cfg.model),
        "data": data_signature(cfg.data),
        "seq_len": cfg.trainer.seq_len,
        "batch_size": batch.batch_size,
        # Options added later enter the identity only when set, so existing arms keep their signature.
        "optimizer": {k: v for k, v in asdict(optimizer).items() if k != "name" or v != "adamw"},
        "precision": precision,
        "token_budget": budget,
        "lr_warmup_tokens": lr_warmup,
        # The branch point by its identity (the warmup's signature), never by its path.
        "init": f"warmup:{init.signature}" if init else f"seed:{cfg.trainer.init_seed}",
        "data_seed": cfg.trainer.data_seed,
        "val_samples": cfg.trainer.val_samples,
        "carry_optimizer": cfg.trainer.carry_optimizer and init is not None,
    }
    if schedule.kind != "constant":
        identity["schedule"] = asdict(schedule)
    if optimizer.name == "invariant_adam":  # its second moment depends on the micro-batch size
        identity["micro_batch_size"] = batch.micro_batch_size
    sig = signature(identity)
    return RunConfig(
        name=name,
        stage=kind,
        signature=sig,
        run_dir=str(run_root / f"{name}-{sig}"),
        data_dir=str(data_dir),
        model=cfg.model,
        optimizer=optimizer,
        batch_size=batch.batch_size,
        seq_len=cfg.trainer.seq_len,
        token_budget=budget,
        split="warmup" if kind == "warmup" else "experiment",
        micro_batch_size=batch.micro_batch_size,
        lr_warmup_tokens=lr_warmup,
        schedule=schedule,
        precision=precision,
        init_checkpoint=str(init.run_dir) if init else "",
        carry_optimizer=cfg.trainer.carry_optimizer and init is not None,
        attn_implementation=cfg.trainer.attn_implementation,
        compile=cfg.trainer.compile,
        loss_chunk_tokens=cfg.trainer.loss_chunk_tokens,
        noise_scale_decay=cfg.trainer.noise_scale_decay,
        peak_flops=cfg.trainer.peak_flops,
        init_seed=cfg.trainer.init_seed,
        data_seed=cfg.trainer.data_seed,
        val_every_tokens=cfg.trainer.val_every_tokens,
        val_samples=cfg.trainer.val_samples,
        checkpoint_every_tokens=cfg.trainer.checkpoint_every_tokens,
        keep_checkpoints=cfg.trainer.keep_checkpoints,
        log_every_steps=cfg.trainer.log_every_steps,
        sweep_name=cfg.experiment.name,
        wandb=cfg.wandb,
    )


def _row(job_name: str, op: str, rule: str, run: RunConfig, batch: BatchPlan, steps: int) -> dict[str, Any]:
    setup = [run.optimizer.name] if run.optimizer.name != "adamw" else []
    setup += [run.schedule.kind] if run.schedule.kind != "constant" else []
    setup += [run.precision] if run.precision != "fp32" else []
    return {
        "arm": job_name,
        "op": op,
        "rule": rule,
        "batch_size": run.batch_size,
        "seq_len": run.seq_len,
        "batch_tokens": batch.tokens_per_step,
        "micro_batch_size": batch.micro_batch_size,
        "grad_accum": batch.grad_accum,
        "lr": run.optimizer.lr,
        "beta1": run.optimizer.beta1,
        "beta2": run.optimizer.beta2,
        "eps": run.optimizer.eps,
        "token_budget": run.token_budget,
        "steps": steps,
        "setup": ",".join(setup) or "-",
        "signature": run.signature,
    }


def build_plan(configs: list[Config], overrides: list[list[str]]) -> SweepPlan:
    """The jobs of a sweep over `configs` (one per Hydra job), deduplicated and checked.

    Raises PlanError listing every problem, so a user fixes them all in one go.
    """
    if not configs:
        raise PlanError("nothing to run: the sweep has no jobs")
    first = configs[0]
    sweep_dir = Path(first.sweep.dir).absolute()
    run_root = sweep_dir / "runs"
    jobs: dict[str, Job] = {}
    errors: list[str] = []
    arm_sigs: dict[str, str] = {}
    # Overrides shared by every job (+experiment=..., model=...) are the sweep's; the others name variants.
    common = set.intersection(*(set(o) for o in overrides))
    for cfg, job_overrides in zip(configs, overrides, strict=True):
        cfg.data = replace(cfg.data, cache_dir=str(Path(cfg.data.cache_dir).absolute()))
        if cfg.experiment.name != first.experiment.name or Path(cfg.sweep.dir).absolute() != sweep_dir:
            errors.append("all jobs of one sweep must share experiment.name and sweep.dir")
            continue
        if not cfg.arm:
            errors.append(f"job {' '.join(job_overrides)}: no arm chosen (set arm=NAME)")
            continue
        try:
            prepare = _prepare_job(cfg.data)
            jobs.setdefault(prepare.name, prepare)
            init: Job | None = None
            deps = [prepare.name]
            if cfg.experiment.warmup.enabled:
                warmup = _warmup_job(cfg, run_root, prepare.name)
                init, deps = warmup, [warmup.name]
                if warmup.name in jobs and jobs[warmup.name].signature != warmup.signature:
                    raise PlanError("jobs of this sweep need different warmups: sweep one warmup at a time")
                jobs.setdefault(warmup.name, warmup)
            variant = [o for o in job_overrides if o not in common and not o.startswith("arm=")]
            arm = _arm_job(cfg, job_overrides, variant, run_root, init, deps)
        except (PlanError, BatchError) as exc:
            errors.append(str(exc))
            continue
        if arm.name in jobs:
            errors.append(
                f"arm name {arm.name!r} appears twice in the sweep: sweep arm alone, or name variants"
            )
        elif arm.signature in arm_sigs:
            errors.append(
                f"arms {arm_sigs[arm.signature]} and {arm.name} are the same run (signature {arm.signature})"
            )
        else:
            jobs[arm.name] = arm
            arm_sigs[arm.signature] = arm.name
    if first.precision.dtype not in ("fp32", "bf16", "fp16"):
        errors.append(f"precision.dtype={first.precision.dtype!r}: expected fp32, bf16 or fp16")
    if first.trainer.val_samples < 1:
        errors.append(
            f"trainer.val_samples={first.trainer.val_samples}: validation needs at least one sequence"
        )
    if first.trainer.seq_len > first.model.max_position_embeddings:
        errors.append(
            f"trainer.seq_len={first.trainer.seq_len} exceeds model.max_position_embeddings="
            f"{first.model.max_position_embeddings}"
        )
    for pair in first.experiment.pairs:
        if len(pair) != 2 or any(a not in first.experiment.arms for a in pair):
            errors.append(
                f"pair {pair} must name two arms of the experiment ({', '.join(first.experiment.arms)})"
            )
    if errors:
        raise PlanError("the sweep cannot run:\n" + "\n".join(f"  - {e}" for e in dict.fromkeys(errors)))
    return SweepPlan(
        first.experiment.name,
        sweep_dir,
        list(jobs.values()),
        first.experiment.pairs,
        first.resources,
        first.ops,
        first.sweep.dry_run,
    )


def _prepare_job(data: DataConfig) -> Job:
    return Job(
        "prepare",
        "prepare",
        data_signature(data),
        data_dir_for(data),
        StageJob("prepare", data=data, max_requeues=0),
    )


def _warmup_job(cfg: Config, run_root: Path, prepare: str) -> Job:
    spec = cfg.experiment.warmup
    if spec.op not in cfg.ops:
        raise PlanError(f"warmup: op {spec.op!r} is not one of the experiment's ops ({', '.join(cfg.ops)})")
    point = cfg.ops[spec.op]
    batch = plan_batches(
        spec.batch_size,
        cfg.trainer.micro_batch_size,
        cfg.resources.world_size,
        cfg.trainer.seq_len,
        spec.token_budget,
    )
    run = _run_config(cfg, "warmup", "warmup", point, batch, spec.token_budget, None, run_root)
    return Job(
        "warmup",
        "warmup",
        run.signature,
        Path(run.run_dir),
        StageJob("train", run=run, max_requeues=cfg.resources.max_requeues),
        [prepare],
        [],
        _row("warmup", spec.op, "none", run, batch, batch.steps),
    )


def _arm_job(
    cfg: Config, overrides: list[str], variant: list[str], run_root: Path, init: Job | None, deps: list[str]
) -> Job:
    assert cfg.arm is not None
    spec = cfg.experiment.arms.get(cfg.arm)
    point = _derive(cfg.arm, cfg)
    budget = (spec.token_budget if spec else 0) or cfg.experiment.token_budget
    try:
        batch = plan_batches(
            point.reference_batch,
            cfg.trainer.micro_batch_size,
            cfg.resources.world_size,
            cfg.trainer.seq_len,
            budget,
        )
    except BatchError as exc:
        raise PlanError(f"arm {cfg.arm}: {exc}") from exc
    # Sweeping other keys than `arm` (e.g. trainer.init_seed=0,1) makes variants of one arm.
    name = cfg.arm if not variant else f"{cfg.arm}[{','.join(variant)}]"
    run = _run_config(cfg, name, "arm", point, batch, budget, init, run_root, spec)
    try:  # every batch a schedule reaches must split over ranks and micro-batches too
        lay = layout(run.schedule, batch.batch_size, cfg.trainer.seq_len, budget)
        for b in sorted(set(lay.batch.tolist())):
            plan_batches(
                b,
                cfg.trainer.micro_batch_size,
                cfg.resources.world_size,
                cfg.trainer.seq_len,
                b * cfg.trainer.seq_len,
            )
    except (ScheduleError, BatchError) as exc:
        raise PlanError(f"arm {cfg.arm}: {exc}") from exc
    if run.optimizer.name not in OPTIMIZERS:
        raise PlanError(
            f"arm {cfg.arm}: optimizer {run.optimizer.name!r}, expected one of {', '.join(OPTIMIZERS)}"
        )
    if run.precision not in ("fp32", "bf16", "fp16"):
        raise PlanError(f"arm {cfg.arm}: precision {run.precision!r}, expected fp32, bf16 or fp16")
    if run.optimizer.name == "invariant_adam" and run.precision == "fp16":
        raise PlanError(f"arm {cfg.arm}: invariant_adam does not support fp16 (use bf16 or fp32)")
    run.tags = [f"op:{spec.op or 'arm:' + spec.from_arm}", f"rule:{spec.rule}"] if spec else []
    op = spec.op if spec and spec.op else f"arm {spec.from_arm}" if spec else "?"
    row = _row(name, op, spec.rule if spec else "?", run, batch, lay.steps)
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
    """Plain aligned text table; floats in 4 significant digits (enough to tell 2.5e-05 from 2.6e-05)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.6g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


ARM_COLUMNS = ["arm", "op", "rule", "batch_size", "batch_tokens", "grad_accum", "lr", "beta1", "beta2", "eps"]
ARM_COLUMNS += ["token_budget", "steps", "setup", "signature"]


def arm_table(plan: SweepPlan) -> str:
    return format_table([j.row for j in plan.jobs if j.row], ARM_COLUMNS)
