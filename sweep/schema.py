"""The Hydra schema: dataclasses registered in the ConfigStore, so YAML is type-checked at compose time.

The YAML files under `conf/` choose values; these classes say which keys exist and of what type.
Model, data, trainer, rule and operating-point nodes are the trainer's own plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from train.config import DataConfig, ModelConfig, TrainerConfig, WandbConfig
from train.rules import OperatingPoint, RuleConfig
from train.schedule import ScheduleConfig


@dataclass
class ArmSpec:
    """One arm: an operating point (named, or another arm's derived point) moved by a rule to a batch."""

    rule: str = "none"  # a key of `rules`
    batch_size: int = MISSING
    op: str = ""  # a key of `ops` ...
    from_arm: str = ""  # ... or another arm, whose derived hyperparameters become this arm's operating point
    token_budget: int = 0  # 0: the experiment's budget (matched budgets are the default)
    lr_scale: float = 1.0  # multiplies the derived lr (an lr sweep around a point, e.g. seed arm K)
    # adamw, or a variant of train/adam_variants.py: invariant_adam, micro_adam, micro_adam_var,
    # micro_adam_msq, sign_example, sign_mean, sign_ema
    optimizer: str = "adamw"
    precision: str = ""  # fp32 | bf16 | fp16; empty: the sweep's precision.dtype (seed arm L: an fp16 twin)
    schedule: str = ""  # constant | step_decay | seesaw; empty: experiment.schedule.kind


@dataclass
class WarmupSpec:
    """The from-scratch run on the `warmup` split whose final weights every arm branches from."""

    enabled: bool = True
    op: str = "base"
    batch_size: int = MISSING
    token_budget: int = MISSING
    lr_warmup_tokens: int = 0
    # Per-rank micro-batch of the warmup; None: trainer.micro_batch_size. The warmup is plain AdamW,
    # so a preset whose arms need one-sequence micro-batches (invariant Adam) need not slow it down.
    micro_batch_size: int | None = None


@dataclass
class CbsSpec:
    """A batch-size ladder for the critical batch size (analysis/cbs.py): its arms, smallest batch
    first, each paired with the first; the loss tolerance of the branched method; the target
    losses of the McCandlish fit (empty: three spread over the range every arm reached)."""

    ladder: list[str] = field(default_factory=list)
    epsilon: float = 0.01  # nats: a batch is within the critical batch while its loss stays this close
    targets: list[float] = field(default_factory=list)


@dataclass
class DecideSpec:
    """The sequential verdict that stops arms (`experiment.stop_when_decided`; analysis/sequential.py):
    its looks, and the verdict's options, fixed before the arms run (the analysis reads them from
    the manifest to reproduce every decision)."""

    looks: int = 8  # equally spaced token counts of the compared range at which each pair is judged
    # "equivalent" is declared only once the range compared covers this share of the budget's
    # (past the skip): a match over the first eighth says little about the rest; 0: at any look.
    # "NOT equivalent" stands at any look: a mismatch once seen stays a mismatch.
    equivalent_from: float = 0.5
    segments: int = 4
    alpha: float = 0.05
    margin: float = 0.0  # nats; 0 = margin_fraction x the yardstick's spread, measured at each look
    margin_fraction: float = 0.25
    keep: list[str] = field(default_factory=list)  # arms that run their budget whatever is decided
    poll_s: float = 10.0  # an arm whose partner is behind looks again after this long


@dataclass
class ExperimentConfig:
    name: str = "default"
    description: str = ""
    ratio: int = 16  # large batch / small batch
    large_batch: int = MISSING
    small_batch: int = MISSING
    token_budget: int = MISSING
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    pairs: list[list[str]] = field(default_factory=list)  # the questions: should these arms match?
    # Pairs that must NOT match (nothing scaled): they show the instrument can tell. Compared and
    # reported as controls; they never enter the margin.
    controls: list[list[str]] = field(default_factory=list)
    # The yardstick of "match": pairs of arms at the same batch size with different operating
    # points (A vs J, H vs B in the seed study). The margin is a fraction of their mean |gap|.
    yardstick: list[list[str]] = field(default_factory=list)
    # A variant's arms at several lrs (`lr_scale`), by variant: the analysis ranks the variants by
    # their best arm (analysis/ladders.py), so none is judged at an lr chosen for another.
    lr_ladders: dict[str, list[str]] = field(default_factory=dict)
    warmup: WarmupSpec = field(default_factory=WarmupSpec)
    # The researcher's own weights every arm branches from, in place of the warmup (which then does
    # not run): a save_pretrained directory or a finished run of this project (train/branch_point.py).
    # Several branch points: sweep it, `-m experiment.branch_from=/ckpt/10B,/ckpt/50B`.
    branch_from: str = ""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # arms' lr (and Seesaw batch) schedule
    cbs: CbsSpec = field(default_factory=CbsSpec)  # the `cbs` preset's ladder; empty elsewhere
    rewarmup_tokens: int = 0  # arms ramp their lr linearly over this many tokens (0: none)
    skip_tokens: int = 0  # the analysis leaves out this many tokens after the branch (its transient)
    # Multiplies every arm's lr (after its rule and its own lr_scale), never the warmup's: swept
    # (experiment.lr_scale=0.25,0.5,1) it runs the whole study at smaller lrs from one branch point.
    lr_scale: float = 1.0
    # Arms stop (checkpoint, state `decided`) once every pair they belong to is decided by the
    # sequential verdict at one of decide.looks looks, and no other pair needs them.
    stop_when_decided: bool = False
    decide: DecideSpec = field(default_factory=DecideSpec)


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 | fp16


@dataclass
class ResourcesConfig:
    """Per-job resources. One task per GPU; on CPU, `tasks_per_node` ranks (gloo)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    # CPUs of the prepare job (one task, no GPU; it tokenizes on all of them); 0: cpus_per_task
    prepare_cpus: int = 0
    mem_gb: int = 0
    timeout_min: int = 240
    signal_lead_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, then requeue
    max_requeues: int = 3
    array_parallelism: int = 0  # >0: submit the arms as one job array running at most this many at once
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters
    # The dry run's GPU-hours estimate: the GPU's dense bf16 peak (H100 SXM: 989.4 TFLOP/s) and the
    # fraction of it the trainer reaches (MFU, PaLM's FLOP convention).
    gpu_peak_tflops: float = 989.4
    assumed_mfu: float = 0.4

    @property
    def world_size(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node)


@dataclass
class SweepOptions:
    root: str = "sweeps"
    dir: str = "${sweep.root}/${experiment.name}"
    dry_run: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ops: dict[str, OperatingPoint] = field(default_factory=dict)
    rules: dict[str, RuleConfig] = field(default_factory=dict)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: SweepOptions = field(default_factory=SweepOptions)
    arm: str | None = None  # the arm this job runs; the experiment's sweep sets it


def whole_division(a: Any, b: Any) -> int:
    """`${intdiv:a,b}`: a / b, refused unless a whole number. The presets derive batch sizes with it
    (small batch = large batch / experiment.ratio): a rounded one would silently change the ratio."""
    a, b = int(a), int(b)
    if b <= 0 or a % b:
        raise ValueError(
            f"{a} / {b} is not a whole number of sequences: experiment.ratio (and the presets' batch "
            "ladders) must be positive and divide experiment.large_batch"
        )
    return a // b


def register() -> None:
    """Register the schema and the resolvers the YAML uses; safe to call more than once."""
    if not OmegaConf.has_resolver("intdiv"):
        OmegaConf.register_new_resolver("intdiv", whole_division)
        OmegaConf.register_new_resolver("intmul", lambda a, b: int(a) * int(b))
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
