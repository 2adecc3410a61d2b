"""`train(cfg)`: one run (the warmup or an arm), as a loop of named phases.

    check inputs -> build model and optimizer -> branch -> resume ->
        loop: one step -> log -> evaluate -> checkpoint
    -> finish

Distributed set-up comes from the standard torch variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK); whoever launched the processes (submitit, a test) exports them. With
none set, the run is a single process. One process per device; NCCL or gloo from which physical
GPU each rank holds, and a rank's failure ends the others within seconds (train/distributed.py).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from records.metrics import VAL_SEQUENCES
from records.run_status import RunClaim, RunInUse, RunState, mark_failed, read_status
from train.adam_variants import VariantAdam
from train.batching import BatchPlan
from train.branch_point import is_project_run
from train.checkpoint import (
    checkpoint_dir,
    find_checkpoint,
    load_trusted,
    newest_complete,
    remove_stale_temporaries,
    save_checkpoint,
)
from train.config import InvalidRun, RunConfig, Steps
from train.data import TokenStream, load_meta, load_split, prepared_problems, validation_windows
from train.distributed import Placement, init_distributed
from train.model import TokenLoss, build_model, load_pretrained, parameter_groups
from train.noise import NoiseSample, NoiseScale
from train.per_example import Moments, UnitGradients
from train.runlog import RunLog
from train.throughput import peak_flops, peak_memory_gb
from train.train_state import Counters, TrainState, rng_state
from train.unit_backward import UnitCollector, install

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_CLIP = 1e9  # trainer.grad_clip at or above this: no clipping (the default; the norm is still measured)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class BadValidation(RuntimeError):
    """Validation loss is 0, NaN or unchanged after training steps: the measurement itself is broken."""


class Stopped(RuntimeError):
    """A stop signal arrived; the run checkpointed at the next step boundary and stopped there."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} (checkpointed)")
        self.signum = signum
        self.step = step


class StopFlag:
    """SIGUSR2 (SLURM's warning before a time limit or preemption), SIGTERM and SIGINT (Ctrl-C of
    a run in the foreground) only set a flag.

    Nothing is written from inside the handler: the loop reads the flag at the next step boundary,
    where model, optimizer and data position are consistent, and checkpoints there.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LocalGradNorm:
    """A DDP communication hook that adds up the squared norm of this rank's gradient (averaged
    over its own samples) before the all-reduce averages it over ranks: the small-batch half of
    the noise-scale estimate, at the cost of one extra pass over the gradient buckets."""

    def __init__(self, device: torch.device) -> None:
        self.sq = torch.zeros((), device=device)

    @staticmethod
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        # Unannotated on purpose: DDP compares the annotations with dist.GradBucket, and with
        # postponed evaluation (`from __future__ import annotations`) they would be strings.
        state.sq += torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32) ** 2  # no bucket copy
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def accumulate_gradients(
    net: torch.nn.Module,
    batch: torch.Tensor,
    plan: BatchPlan,
    ddp: bool,
    autocast: Any,
    scaler: torch.amp.GradScaler | None = None,
    loss_scale: float = 1.0,
    units: Units | None = None,
    local_norm: LocalGradNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Moments | None]:
    """Forward and backward over this rank's micro-batches of one step, leaving in `.grad` the
    mean gradient over every token of the global batch (times the fp16 loss scale, if `scaler`;
    `loss_scale` is its current value, read once per step by the caller).

    Gradients are all-reduced only on the last micro-batch; DDP then averages over ranks, so
    dividing each rank's token sum by (step tokens / world) gives exactly the mean over every token
    of the global batch, as one large batch would. Returns this rank's summed token loss, on a
    single process with accumulation the squared norm of the first micro-batch's mean gradient
    (for the noise scale; with DDP the `LocalGradNorm` hook measures the per-rank one instead),
    and the step's per-unit moments where `units` asks for them.

    With `units` (the variants of train/adam_variants.py, per-example statistics) every unit's
    gradient goes into its sums (train/per_example.py): a micro-batch's moved out of `.grad` after
    its backward, or, with `units.collector`, each sequence's or token's formed inside the
    backward (train/unit_backward.py; the module is run itself, not through DDP). No micro-batch
    syncs through DDP: `UnitGradients.finish` reduces the sums itself at the end, and the per-rank
    norm it returns goes into `local_norm` in place of the hook's.
    """
    world = plan.world_size
    scaling = scaler is not None and scaler.is_enabled()
    micro_sq: torch.Tensor | None = None
    loss_sum = torch.zeros((), device=batch.device)
    if units is not None:
        units.sums.begin()
    for j in range(plan.grad_accum):
        micro = batch[j * plan.micro_batch_size : (j + 1) * plan.micro_batch_size]
        if units is not None and units.collector is not None:
            loss_sum += units.collector.micro_batch(micro, autocast)
            continue
        sync = not ddp or (j == plan.grad_accum - 1 and units is None)
        with contextlib.nullcontext() if sync else net.no_sync(), autocast():  # type: ignore[operator]
            part = net(micro)
        share = part * (world / plan.tokens_per_step)
        (scaler.scale(share) if scaling else share).backward()  # type: ignore[union-attr]
        loss_sum += part.detach()
        if j == 0 and not ddp and plan.grad_accum > 1:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            # .grad now holds (micro tokens / step tokens) x the micro-batch's mean gradient.
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            micro_sq = (norm * plan.grad_accum / loss_scale) ** 2
        if units is not None:
            units.sums.add_grads(factor=plan.grad_accum)  # .grad = the micro-batch's gradient / grad_accum
    if units is None:
        return loss_sum, micro_sq, None
    moments, local_sq = units.sums.finish(world if ddp else 1)
    if ddp and local_norm is not None:
        local_norm.sq.copy_(local_sq)
    return loss_sum, micro_sq, moments


@dataclass
class Units:
    """Where a step's per-unit gradients come from: `sums` accumulates them; `collector` (set when
    the units are sequences or tokens) forms them inside each micro-batch's backward
    (train/unit_backward.py); without it each micro-batch is one unit, moved out of `.grad`."""

    sums: UnitGradients
    collector: UnitCollector | None = None


def probe_gradient(network: Network, probe: torch.Tensor, plan: BatchPlan, scale: float) -> torch.Tensor:
    """The noise-scale pair of a step with one batch size (one process, one micro-batch): the
    gradient of `probe` (B other samples) at the step's weights against the step's own gradient,
    two independent batches of B (see train/noise.py). The step's gradient is set aside by
    reference and put back, so the update is exactly what it would have been. Returns, on the
    device, |G_1|^2, |G_2|^2 (unscaled) and G_1 . G_2 (`StepTensors.read` makes the sample)."""
    step_grads = [p.grad for p in network.params]
    for p in network.params:
        p.grad = None
    with network.autocast():
        part = network.net(probe)
    (part * (scale / plan.tokens_per_step)).backward()
    pairs = [
        (a, b.grad)
        for a, b in zip(step_grads, network.params, strict=True)
        if a is not None and b.grad is not None
    ]
    for p, g in zip(network.params, step_grads, strict=True):
        p.grad = g
    sums = torch.stack([_squares_and_dot(a.float().flatten(), b.float().flatten()) for a, b in pairs]).sum(0)
    # Python scalars go to the kernels as arguments: a tensor of them would be a host-to-device copy.
    return torch.stack([sums[0], sums[1] / scale**2, sums[2] / scale])


def _squares_and_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a @ a, b @ b, a @ b])


@dataclass
class Network:
    """The model as a step drives it: wrapped for DDP (and torch.compile), under autocast, with
    the per-rank gradient-norm hook, plus what the step needs of the run's settings."""

    net: torch.nn.Module
    params: list[torch.nn.Parameter]
    where: Placement
    dtype: torch.dtype | None
    grad_clip: float
    local_norm: LocalGradNorm
    units: Units | None = None  # per-unit moments (train/per_example.py); None: plain AdamW

    @property
    def per_sequence(self) -> bool:
        """The units are sequences or tokens (formed inside the backward): their norm sums are
        the per-example statistics."""
        return self.units is not None and self.units.collector is not None

    def autocast(self) -> Any:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.where.device.type, dtype=self.dtype)


@dataclass
class StepResult:
    loss: float  # mean token loss of the global batch
    grad_norm: float  # global norm before clipping (inf / nan on an fp16 overflow step)
    noise: NoiseSample | None  # the step's two gradient norms for B_simple (None: none this step)
    signum: int  # a stop signal any rank received (0: none)
    loss_scale: float  # the fp16 gradient scaler's scale during the step (1 without it)
    per_example: dict[str, float]  # per-sequence gradient statistics (empty: not measured)
    decided: bool = False  # rank 0 found this arm's pairs decided (experiment.stop_when_decided)


# `StepTensors.values`: the step's figures in one float64 vector on the device.
LOSS_SUM, GRAD_NORM, SMALL_SQ, REQUEUE, STOP, DECIDED, PROBE = range(7)  # PROBE: 3 values
FIXED = PROBE + 3  # then the per-example norm sums (train/per_example.py Moments.sums), if any


@dataclass
class StepTensors:
    """A step as it left the device queue: its figures still on the device, one vector copied
    towards the host without waiting (pinned memory on a GPU). `read()` waits for that copy alone,
    so the trainer reads a step's figures after it has queued the next step, and the GPU never
    idles for the host. What stays on the host is known before the step: the plan, the host's own
    signal and decision (one process), which figures the step has."""

    values: torch.Tensor  # see LOSS_SUM ... FIXED; copied to `host` by `copy()`
    plan: BatchPlan
    world: int  # ranks (the small batch of the DDP noise estimate is a rank's share)
    ddp: bool
    signum: int  # this process's stop signal when the step was queued (one process)
    decided: bool  # this process's decision when the step was queued (one process)
    loss_scale: float
    small: bool  # the step measured a small-batch gradient norm (SMALL_SQ)
    probed: bool  # the step ran the noise probe (PROBE)
    moments: Moments | None  # per-example statistics: their layout (the sums are in `values`)
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

    def copy(self) -> StepTensors:
        """Start the copy to the host: a pinned buffer and an event on a GPU; nothing on a CPU."""
        if self.values.device.type == "cuda":
            self.host = torch.empty(self.values.shape, dtype=self.values.dtype, pin_memory=True)
            self.host.copy_(self.values, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = self.values
        return self

    def read(self) -> StepResult:
        """The step's figures on the host (waits for this step's copy, nothing else)."""
        if self.host is None:
            self.copy()
        if self.copied is not None:
            self.copied.synchronize()
        assert self.host is not None
        v = self.host.tolist()
        plan = self.plan
        signum, decided = self.signum, self.decided
        if self.ddp:  # what the step's collective said: any rank's signal, rank 0's decision
            signum = signal.SIGUSR2 if v[REQUEUE] > 0 else signal.SIGTERM if v[STOP] > 0 else 0
            decided = v[DECIDED] > 0
        norm = v[GRAD_NORM]
        noise = None
        if not math.isfinite(norm):  # an fp16 overflow step was skipped: no gradient to measure
            noise = None
        elif self.small:  # per-rank (DDP) or first-micro-batch gradient against the global one
            b_small = plan.batch_size // self.world if self.ddp else plan.micro_batch_size
            noise = NoiseSample(v[SMALL_SQ], b_small, norm**2, plan.batch_size)
        elif self.probed:
            one_sq, two_sq, cross = v[PROBE : PROBE + 3]
            if all(map(math.isfinite, (one_sq, two_sq, cross))):
                b = plan.batch_size
                noise = NoiseSample((one_sq + two_sq) / 2, b, (one_sq + two_sq + 2 * cross) / 4, 2 * b)
        return StepResult(
            loss=v[LOSS_SUM] / plan.tokens_per_step,
            grad_norm=norm,
            noise=noise,
            signum=signum,
            loss_scale=self.loss_scale,
            per_example=self.moments.statistics(v[FIXED:]) if self.moments is not None else {},
            decided=decided,
        )


def launch_step(
    network: Network,
    state: TrainState,
    batch: torch.Tensor,
    plan: BatchPlan,
    signum: int,
    probe: torch.Tensor | None = None,
    decided: bool = False,
) -> StepTensors:
    """One optimizer step on this rank's share of the global batch, queued without reading
    anything back to the host: gradients (accumulated over micro-batches), clipping, the optimizer
    step, and the one collective per step, which carries the loss, whether any rank was asked to
    stop (so every rank stops at the same step, whichever got the signal), whether rank 0 found
    the arm's pairs decided (`decided`: every rank stops after this step) and the per-rank
    gradient norms. `probe`: a second batch of samples whose gradient at these weights pairs with
    the step's for the noise scale (`probe_gradient`). fp16's gradient scaler reads whether the
    gradients overflowed (a host sync of its own); fp32 and bf16 steps sync nowhere."""
    where, scaler, optimizer = network.where, state.scaler, state.optimizer
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    network.local_norm.sq.zero_()
    loss_sum, small_sq, moments = accumulate_gradients(
        network.net,
        batch,
        plan,
        where.ddp,
        network.autocast,
        scaler,
        scale,
        network.units,
        network.local_norm,
    )
    if isinstance(optimizer, VariantAdam) and moments is not None:
        optimizer.feed(moments)
    scaler.unscale_(optimizer)  # a no-op unless fp16
    probed = None if probe is None else probe_gradient(network, probe, plan, scale)
    grads = [p.grad for p in network.params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)  # before clipping
    if network.grad_clip < NO_CLIP:  # else a multiply of every gradient by 1, skipped
        torch.nn.utils.clip_grads_with_norm_(network.params, network.grad_clip, grad_norm)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    device = where.device
    flags = torch.zeros(3, device=device)
    if where.ddp:
        # [requeue after stopping (SLURM's warning), stop for good (SIGTERM, SIGINT), decided],
        # set by kernels with the flag as their argument: a tensor made from a list is a copy.
        for i, on in enumerate((signum == signal.SIGUSR2, signum not in (0, signal.SIGUSR2), decided)):
            if on:
                flags[i].fill_(1.0)
        per_rank = network.local_norm.sq / scale**2
        packed = torch.cat([loss_sum.float()[None], flags, per_rank[None]])
        dist.all_reduce(packed)
        loss_sum, flags, small_sq = packed[0], packed[1:4], packed[4] / where.world
    nothing = torch.full((), math.nan, device=device)
    parts = [
        loss_sum.double()[None],
        grad_norm.double()[None],
        (nothing if small_sq is None else small_sq).double()[None],
        flags.double(),
        (nothing.expand(3) if probed is None else probed).double(),
    ]
    statistics = moments if network.per_sequence else None  # their norm sums are the step's too
    if statistics is not None and statistics.sums is not None:
        parts.append(statistics.sums)
    return StepTensors(
        values=torch.cat(parts),
        plan=plan,
        world=where.world,
        ddp=where.ddp,
        signum=signum,
        decided=decided,
        loss_scale=scale,
        small=small_sq is not None,
        probed=probed is not None,
        moments=statistics,
    ).copy()


class LookThread(threading.Thread):
    """One look at an arm's pairs, in the background (a daemon: an arm that ends mid-look does
    not wait for it); `decided` and `error` once it has ended."""

    def __init__(self, decisions: Decisions, tokens: int) -> None:
        super().__init__(daemon=True, name="look")
        self.decisions, self.tokens = decisions, tokens
        self.decided, self.error = False, ""
        self.start()

    def run(self) -> None:
        try:
            self.decided = self.decisions.look(self.tokens)
        except Exception as exc:  # reported by the loop, which goes on training
            self.error = f"{type(exc).__name__}: {exc}"


class Decisions(Protocol):
    """The looks of an arm that stops once its pairs are decided (experiment.stop_when_decided):
    the sweep provides them (analysis/stopping.py); training only asks, on rank 0, when to look,
    whether to stop, and what to record (status.json) and show (the W&B summary)."""

    def due(self, tokens: int) -> bool: ...

    def look(self, tokens: int) -> bool: ...

    def record(self) -> dict[str, Any]: ...

    def summary(self) -> dict[str, Any]: ...


def train(cfg: RunConfig, decisions: Decisions | None = None) -> dict[str, Any]:
    """Run `cfg` to its token budget, resuming from its newest checkpoint if it has one; with
    `decisions`, stop (state `decided`) once they say the arm's pairs are decided.

    Whatever stops it, `status.json` says so: an error before training starts (bad data dir, a
    budget the split cannot hold) is recorded as failed just like one in the loop, and so is the
    first error of any rank of a DDP run (rank 0's `PeerWatch` records it when another rank fails).
    """
    if (read_status(cfg.run_dir) or {}).get("state") == RunState.DECIDED:
        # Stopped for good once its pairs were decided: a requeue or rerun must not train it on.
        print(f"{cfg.name}: decided earlier ({cfg.run_dir}/status.json): nothing to run", flush=True)
        return {"name": cfg.name, "signature": cfg.signature, "decided": True}
    where = init_distributed(cfg.trainer.device)
    fields = dict(name=cfg.name, stage=cfg.stage, signature=cfg.signature, token_budget=cfg.token_budget)
    if where.watch is not None and where.rank == 0:
        where.watch.on_failure = lambda first: mark_failed(cfg.run_dir, first, **fields)
    try:
        claim = _claim(cfg, where)  # a second start of this run stops here, touching nothing of it
        try:
            with StopFlag() as stop:
                return Trainer(cfg, where, stop, decisions).run()
        except BaseException as exc:
            error = _ending(where, exc)
            if where.rank == 0:
                mark_failed(cfg.run_dir, error, **fields)
            raise
        finally:
            claim.release()
    finally:
        if where.watch is not None:
            where.watch.close()


# Raised by every rank at the same point (after the collective that decided it), so no rank waits
# for another: no peer failure to report.
COORDINATED = (Stopped, Diverged, BadValidation)


def _ending(where: Placement, exc: BaseException) -> str:
    """The error to record for `exc`: where this rank failed alone, the first failing rank's."""
    error = f"{type(exc).__name__}: {exc}"
    if where.watch is None:
        return error
    return where.watch.ending(error, failure=not isinstance(exc, COORDINATED))


def _claim(cfg: RunConfig, where: Placement) -> RunClaim:
    """Rank 0 claims the run dir; every rank learns whether it got it (one broadcast). With the
    claim held, temporary files in the run dir are a dead writer's: they are removed."""
    claim = RunClaim(cfg.run_dir)
    refused = ""
    if where.rank == 0:
        try:
            claim.acquire(job_id=str(cfg.launch.get("job_id") or cfg.launch.get("local_job_id") or ""))
            remove_stale_temporaries(cfg.run_dir)
        except RunInUse as exc:
            refused = str(exc)
    if where.ddp:
        flag = torch.tensor([float(bool(refused))], device=where.device)
        dist.broadcast(flag, 0)
        refused = refused or ("run dir claimed by another process (see rank 0)" if flag.item() else "")
    if refused:
        raise RunInUse(refused)
    return claim


def ddp_options(cfg: RunConfig) -> dict[str, Any]:
    """How DDP wraps the model, and why:
    - `broadcast_buffers=False`: the decoder's only buffers are RoPE's frequencies, the same on
      every rank from the start and never changed; broadcasting them is a collective per forward.
    - `gradient_as_bucket_view=True` (plain steps): gradients are views into the all-reduce
      buckets instead of copies beside them: one model-sized gradient copy less in memory and in
      traffic per step. Not with per-unit moments: those steps set `.grad` themselves to the
      reduced means (train/per_example.py), and no bucket reduces them.
    - `static_graph` is not set: the per-unit steps never sync through the reducer, and the
      plain steps use every parameter, so there is no unused-parameter search to spare.
    - Buckets stay at DDP's 25 MB: small enough that the first all-reduce starts early in the
      backward and the last one, after it, is short."""
    # torch 2.13 renames the option (and warns about the old name); older releases know only the old one
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return {buffers: False, "gradient_as_bucket_view": not cfg.unit_moments}


class Trainer:
    """One run, phase by phase. Each phase is a method; `run()` is the loop that calls them."""

    def __init__(
        self, cfg: RunConfig, where: Placement, stop: StopFlag, decisions: Decisions | None = None
    ) -> None:
        self.started = time.perf_counter()
        self.cfg, self.where, self.stop = cfg, where, stop
        self.steps, self.stream = self.check_inputs()
        self.state = self.build()
        self.branch()
        resumed = self.resume()
        self.network = self.wrap()
        # Rows a killed earlier attempt logged past its last checkpoint (all of them, if it had
        # none) are superseded by what this attempt logs.
        resume_step = self.state.step if resumed else -1
        self.log = (
            RunLog(cfg, self.steps.layout.steps, resume_step, where.describe()) if where.rank == 0 else None
        )
        if self.log is not None:  # where this attempt starts: `sweep.status` averages its rate from here
            self.log.update(
                force=True, step=self.state.step, tokens=self.state.tokens, start_tokens=self.state.tokens
            )
        self.evaluator = TokenLoss(self.state.model, cfg.trainer.loss_chunk_tokens)
        val = load_split(cfg.data_dir, "validation")
        windows = validation_windows(val, cfg.trainer.seq_len, cfg.trainer.val_samples)
        self.val = torch.from_numpy(windows).to(where.device)
        self.previous_val: list[float] = []
        self.meter = Meter(self)
        self.looks = decisions if self.log is not None else None  # rank 0 looks
        self.looking: LookThread | None = None  # a look in progress
        self.decided = False  # rank 0 found the arm's pairs decided: every rank stops after the next step
        self.pending: tuple[int, StepTensors] | None = None  # a queued step whose figures are unread
        self.next_batch: tuple[int, torch.Tensor] | None = None  # the next step's samples, sent ahead

    # --- Phase 1: refuse what cannot work before any step is taken.
    def check_inputs(self) -> tuple[Steps, TokenStream]:
        cfg = self.cfg
        steps = cfg.validate(self.where.world)  # the same checks the planner made
        load_meta(cfg.data_dir)  # a clear error where the data was never prepared
        samples = steps.layout.tokens_after(steps.layout.steps - 1) // cfg.trainer.seq_len
        problems = prepared_problems(
            cfg.data_dir, cfg.model.vocab_size, cfg.split, cfg.trainer.seq_len, samples
        )
        if problems:
            raise InvalidRun(problems)
        stream = TokenStream(load_split(cfg.data_dir, cfg.split), cfg.trainer.seq_len, cfg.trainer.data_seed)
        return steps, stream

    # --- Phase 2: model and optimizer, seeded and cold.
    def build(self) -> TrainState:
        cfg, device = self.cfg, self.where.device
        model = build_model(cfg.model, cfg.trainer.init_seed, cfg.trainer.attn_implementation)
        model.to(device)  # type: ignore[arg-type]  # in place; transformers types `.to` as a decorator
        optimizer: torch.optim.Optimizer
        if cfg.optimizer.name != "adamw":
            optimizer = VariantAdam(model.parameters(), cfg.optimizer.name)
        else:
            fused = cfg.trainer.fused_adamw and device.type == "cuda"  # else torch's foreach implementation
            optimizer = torch.optim.AdamW(model.parameters(), fused=fused)
        return TrainState(
            model=model,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
            noise=NoiseScale(cfg.trainer.noise_scale_decay),
            layout=self.steps.layout,
            run_id=cfg.signature,
            counters=Counters(),
        )

    # --- Phase 3: the branch point's weights (and Adam moments, if asked); then the arm's own
    # hyperparameters, also over a carried optimizer state.
    def branch(self) -> None:
        cfg, state = self.cfg, self.state
        if cfg.init_checkpoint and not is_project_run(cfg.init_checkpoint):
            load_pretrained(
                state.model, cfg.init_checkpoint
            )  # experiment.branch_from: the researcher's weights
        elif cfg.init_checkpoint:
            point = _branch_point(cfg.init_checkpoint, self.where)
            state.model.load_state_dict(point["model"])
            if cfg.trainer.carry_optimizer:
                state.optimizer.load_state_dict(point["optimizer"])
        for group in state.optimizer.param_groups:
            group.update(
                lr=cfg.optimizer.lr,
                betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                eps=cfg.optimizer.eps,
                weight_decay=cfg.optimizer.weight_decay,
            )

    # --- Phase 4: everything that decides the next step, from the newest valid checkpoint.
    def resume(self) -> bool:
        checkpoint = shared_checkpoint(self.cfg.run_dir, self.where)
        if checkpoint is None:
            return False
        self.state.load_state_dict(checkpoint, self.where.rank)
        return True

    def wrap(self) -> Network:
        cfg, where = self.cfg, self.where
        loss = TokenLoss(self.state.model, cfg.trainer.loss_chunk_tokens, cfg.trainer.loss_kernel)
        net: torch.nn.Module = loss
        local_norm = LocalGradNorm(where.device)
        if cfg.trainer.compile:
            loss.compile_regions()
        if where.ddp:
            net = torch.nn.parallel.DistributedDataParallel(net, **ddp_options(cfg))
            net.register_comm_hook(local_norm, LocalGradNorm.hook)  # type: ignore[arg-type]
        named = [(n, p) for n, p in loss.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        network = Network(net, params, where, DTYPES[cfg.precision], cfg.trainer.grad_clip, local_norm)
        if cfg.unit_moments:
            optimizer = self.state.optimizer
            by_id = parameter_groups(loss)
            groups = [by_id[id(p)] for p in params]
            squares = isinstance(optimizer, VariantAdam) and optimizer.needs_squares
            signs = isinstance(optimizer, VariantAdam) and optimizer.needs_signs
            unit = cfg.trainer.per_example_unit if cfg.per_example else "micro-batch"
            sums = UnitGradients(params, groups, squares, signs, norms=cfg.per_example, unit=unit)
            network.units = Units(sums)
            if cfg.per_example:  # units are sequences or tokens, formed inside the backward
                collector = UnitCollector(
                    network.units.sums, loss, cfg.trainer.per_example_unit, cfg.trainer.seq_len
                )
                install(loss, collector, compiled=cfg.trainer.compile)
                loss.units = network.units.collector = collector
        return network

    def run(self) -> dict[str, Any]:
        """The loop: one optimizer step per global batch, stopping only at step boundaries."""
        state, steps = self.state, self.steps.layout.steps
        decided = False  # stopped once its pairs were decided: no final evaluation, state `decided`
        try:
            if state.step == 0:
                self.evaluate()
            self.meter.start_window()  # after the first evaluation: tokens/s measures training
            for step in range(state.step, steps):
                # Step k is queued before step k-1's figures are read (`take`): the host waits
                # for nothing inside a step. Where the loop must act on step k itself (an
                # evaluation, a checkpoint, the end, a stop or a decision read from step k-1)
                # it reads step k too; a stop or a decision thus acts one step late at most.
                queued = (step, self.one_step(step))
                results = [self.take(*self.pending)] if self.pending is not None else []
                self.pending = queued
                last = state.step >= steps
                evaluate = self.crossed(self.cfg.trainer.val_every_tokens) and not last
                save = self.crossed(self.cfg.trainer.checkpoint_every_tokens) and not last
                if last or evaluate or save or any(r.decided or r.signum for r in results):
                    results.append(self.take(*self.pending))
                    self.pending = None
                if any(r.decided for r in results) and not last:
                    self.checkpoint()
                    decided = True
                    break
                signum = next((r.signum for r in results if r.signum), 0)
                stopping = bool(signum) and not last
                if evaluate:
                    self.evaluate()
                if stopping or save:
                    self.checkpoint()
                if stopping:
                    raise Stopped(signum, state.step)
            if not state.finished and not decided:
                self.evaluate()
                state.finished = True
                self.checkpoint()
        except BaseException as exc:
            self.finish(exc, _ending(self.where, exc))
            raise
        self.finish(None, decided=decided)
        return {
            "name": self.cfg.name,
            "signature": self.cfg.signature,
            "steps": steps,
            "tokens": self.cfg.token_budget,
        }

    # --- Phase 5: one step at the schedule's lr on the step's samples, queued; then the next
    # step's samples gathered and on their way to the device while this one runs.
    def one_step(self, step: int) -> StepTensors:
        state = self.state
        lr = self.lr_at(step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        plan = self.steps.plan(step)
        batch = self.batch_of(step)
        queued = launch_step(
            self.network, state, batch, plan, self.stop.signum, self.probe(step), self.decided
        )
        state.step = step + 1
        if state.step < self.steps.layout.steps:
            self.next_batch = (state.step, self.batch_of(state.step))
        return queued

    # --- Phase 5b: a step's figures, read one step later: divergence and the noise scale judged
    # on what it measured, then its row.
    def take(self, step: int, queued: StepTensors) -> StepResult:
        result = queued.read()
        done = step + 1
        if not math.isfinite(result.loss):
            raise Diverged(f"loss {result.loss} at step {done}")
        clips = self.cfg.trainer.grad_clip < NO_CLIP
        # (an fp16 overflow step was skipped: no gradient to judge)
        if clips and math.isfinite(result.grad_norm):
            self.state.counters.clipped_steps += result.grad_norm > self.cfg.trainer.grad_clip
        if result.noise is None:
            self.state.noise.skip()
        else:
            self.state.noise.update(result.noise)
        self.record(result, done)
        return result

    def batch_of(self, step: int) -> torch.Tensor:
        """This rank's samples of `step` on the device: the ones sent ahead, or gathered now."""
        ahead, self.next_batch = self.next_batch, None
        if ahead is not None and ahead[0] == step:
            return ahead[1]
        offset, where = int(self.steps.layout.offset[step]), self.where
        return self.to_device(
            self.stream.rank_slice(offset, self.steps.plan(step).batch_size, where.rank, where.world)
        )

    def to_device(self, rows: Any) -> torch.Tensor:
        """Token rows to the device without the host waiting: from pinned memory, asynchronously,
        on a GPU (a pageable copy would wait for the queue to drain)."""
        host = torch.from_numpy(rows)
        if self.where.device.type != "cuda":
            return host.to(self.where.device)
        return host.pin_memory().to(self.where.device, non_blocking=True)

    def probe(self, step: int) -> torch.Tensor | None:
        """Every `noise_probe_every` steps of a step with one batch size (one process, no
        accumulation), the next step's first B samples: the noise scale's second batch."""
        every, lay, where = self.cfg.trainer.noise_probe_every, self.steps.layout, self.where
        plan = self.steps.plan(step)
        if every <= 0 or where.ddp or plan.grad_accum > 1 or (step + 1) % every or step + 1 >= lay.steps:
            return None
        return self.to_device(self.stream.samples(int(lay.offset[step + 1]), plan.batch_size))

    # --- Phase 6: the step's row (metrics.jsonl, W&B) and the heartbeat (status.json); rank 0.
    def record(self, result: StepResult, done: int) -> None:
        """`result`: the figures of the step that made it `done` steps."""
        state, plan = self.state, self.steps.plan(done - 1)
        tokens_per_s = self.meter.tick(plan.tokens_per_step)
        if self.log is None:
            return
        trainer, tokens = self.cfg.trainer, self.steps.layout.tokens_after(done - 1)
        if done % trainer.log_every_steps == 0 or done == self.steps.layout.steps:
            row: dict[str, Any] = {
                "step": done,
                "tokens": tokens,
                "loss": result.loss,
                "lr": self.lr_at(done - 1),
                "beta1": self.cfg.optimizer.beta1,
                "beta2": self.cfg.optimizer.beta2,
                "batch_size": plan.batch_size,
                "grad_norm": result.grad_norm,
                "clip_fraction": state.counters.clipped_steps / done,
                "b_simple": state.noise.b_simple,  # sequences, smoothed
                "grad_sq": state.noise.last_signal,  # this step's |G|^2 and tr(Sigma), unsmoothed
                "noise_trace": state.noise.last_noise,
                "tokens_per_s": tokens_per_s,
                "mfu": self.meter.mfu(tokens_per_s),
                "peak_mem_gb": peak_memory_gb(self.where.device),
                "gpu_hours": state.counters.device_seconds / 3600,
            }
            if state.scaler.is_enabled():
                row["loss_scale"] = result.loss_scale
            row.update(result.per_example)  # pe_norm_mean/std, b_simple_exact, snr_<group>, ...
            self.log.log({k: v for k, v in row.items() if v is not None})
        self.log.update(step=done, tokens=tokens, loss=result.loss, tokens_per_s=tokens_per_s)
        self.meter.show(plan.tokens_per_step, result.loss)
        if self.looks is not None and not self.decided:
            self.look(tokens)

    # --- Phase 6b: the sequential verdict's looks (experiment.stop_when_decided; rank 0), on a
    # thread: a look reads every partner's rows, which must not stall the steps. A decision stops
    # every rank after the next step, through that step's collective.
    def look(self, tokens: int) -> None:
        """`tokens`: what the arm has trained on by the step just recorded."""
        assert self.log is not None and self.looks is not None
        looking = self.looking
        if looking is None:
            if self.looks.due(tokens):
                self.looking = LookThread(self.looks, tokens)
            return
        if looking.is_alive():
            return
        self.looking = None
        if looking.error:  # a torn file, a partner's run dir gone: this look decides nothing
            print(f"{self.cfg.name}: a look at its pairs failed ({looking.error}); trying again", flush=True)
            return
        self.decided = looking.decided
        self.log.update(force=True, decision=self.looks.record())
        self.log.summary(self.looks.summary())
        if self.decided:
            verdicts = ", ".join(f"{p}: {d['verdict']}" for p, d in self.looks.record()["pairs"].items())
            print(
                f"{self.cfg.name}: its pairs are decided ({verdicts}): stopping after the next step",
                flush=True,
            )

    # --- Phase 7: the loss on the fixed validation slice, per sequence. Every rank evaluates its
    # share into its slots of one vector, all-reduced, so all ranks know the result and a broken
    # measurement stops them all. The per-sequence losses are logged too: every arm is evaluated on
    # the same sequences, so the analysis pairs them sequence by sequence.
    def evaluate(self) -> None:
        where, cfg, n = self.where, self.cfg, len(self.val)
        self.evaluator.eval()
        per_sequence = torch.zeros(n, device=where.device)  # summed token loss of each sequence
        first, last = where.rank * n // where.world, (where.rank + 1) * n // where.world
        eval_batch = self.steps.plans[cfg.batch_size].micro_batch_size
        with torch.no_grad(), self.network.autocast():
            for i in range(first, last, eval_batch):
                j = min(i + eval_batch, last)
                per_sequence[i:j] = self.evaluator.per_sequence(self.val[i:j])
        self.evaluator.train()
        if where.ddp:
            dist.all_reduce(per_sequence)
        val_loss = per_sequence.sum().item() / (n * cfg.trainer.seq_len)
        step = self.state.step
        if self.log is not None:
            sequences = (per_sequence / cfg.trainer.seq_len).tolist()
            self.log.log(
                {"step": step, "tokens": self.state.tokens, "val_loss": val_loss, VAL_SEQUENCES: sequences}
            )
            # For `sweep.status`: the same sequences for every arm, unlike one step's training loss.
            self.log.update(val_loss=val_loss, val_tokens=self.state.tokens)
        if not math.isfinite(val_loss) or val_loss <= 0:
            raise BadValidation(f"validation loss {val_loss} at step {step}: the measurement is broken")
        if self.previous_val and val_loss == self.previous_val[-1]:
            raise BadValidation(
                f"validation loss unchanged ({val_loss}) from the previous evaluation to step {step}: "
                "the weights are not being updated"
            )
        self.previous_val.append(val_loss)

    # --- Phase 8: a checkpoint of the state, with every rank's RNG states (one gather), so that
    # a resumed rank continues its own streams; rank 0 writes it, and every rank waits until it is
    # on disk: a rank that left earlier (on a stop) would end the job step on clusters that kill
    # it when one task exits, killing the writer with it.
    def checkpoint(self) -> None:
        # Every step's figures are read before a checkpoint: its counters and noise EMAs are the
        # state after the last step, as exact resume needs.
        assert self.pending is None, "a checkpoint with a step's figures unread"
        rngs: list[Any] = [None] * self.where.world
        if self.where.ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.where.rank == 0:
            state = self.state.state_dict(rngs, lr=self.lr_at(self.state.step - 1))
            save_checkpoint(self.cfg.run_dir, self.state.step, state, self.cfg.trainer.keep_checkpoints)
        if self.where.ddp:
            dist.barrier()

    def finish(self, exc: BaseException | None, error: str = "", decided: bool = False) -> None:
        """Say how the run ended (status.json, W&B) and close the progress bar; `error`: what to
        record of `exc` (the first failing rank's error, see `_ending`); `decided`: it stopped
        once its pairs were decided."""
        self.meter.close()
        if self.log is not None:
            if exc is None:
                self.log.close(RunState.DECIDED if decided else RunState.COMPLETED)
            elif isinstance(exc, Diverged):
                self.log.close(RunState.DIVERGED, str(exc))
            elif isinstance(exc, Stopped):
                self.log.close(RunState.STOPPED, str(exc))
            else:
                self.log.close(RunState.FAILED, error)
        if exc is None and self.where.ddp:
            dist.barrier()

    def lr_at(self, step: int) -> float:
        """The schedule's lr for step `step`, after a linear ramp counted in tokens (batch-size invariant)."""
        lay = self.steps.layout
        lr = self.cfg.optimizer.lr * float(lay.lr_factor[step])
        if self.cfg.lr_warmup_tokens <= 0:
            return lr
        return lr * min(1.0, lay.tokens_after(step) / self.cfg.lr_warmup_tokens)

    def crossed(self, every_tokens: int) -> bool:
        """Whether the step just done crossed a multiple of `every_tokens`."""
        if every_tokens <= 0:
            return False
        lay, done = self.steps.layout, self.state.step
        return lay.tokens_after(done - 1) // every_tokens > lay.tokens_after(done - 2) // every_tokens


class Meter:
    """Throughput, MFU, device time and the progress bar of one attempt of a run."""

    WINDOW_S = 10.0  # tokens/s is measured over windows of about this long

    def __init__(self, trainer: Trainer) -> None:
        cfg, where = trainer.cfg, trainer.where
        self.state, self.world = trainer.state, where.world
        self.flops = cfg.model.flops_per_token(cfg.trainer.seq_len)
        self.peak = peak_flops(where.device, cfg.precision, cfg.trainer.peak_flops)
        self.start_window()
        self.step_end = trainer.started  # device time counts from start-up: the devices are held all along
        self.bar = None
        if trainer.log is not None and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.token_budget,
                initial=trainer.state.tokens,
                desc=cfg.name,
                unit="tok",
                unit_scale=True,
            )

    def start_window(self) -> None:
        self.window_time, self.window_tokens = time.perf_counter(), 0

    def tick(self, tokens: int) -> float:
        """A step of `tokens` tokens just ended: add its device time; tokens/s over the window."""
        now = time.perf_counter()
        self.state.counters.device_seconds += (now - self.step_end) * self.world
        self.step_end = now
        self.window_tokens += tokens
        tokens_per_s = self.window_tokens / max(now - self.window_time, 1e-9)
        if now - self.window_time > self.WINDOW_S:
            self.window_time, self.window_tokens = now, 0
        return tokens_per_s

    def mfu(self, tokens_per_s: float) -> float | None:
        return self.flops * tokens_per_s / (self.peak * self.world) if self.peak else None

    def show(self, tokens: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _branch_point(run_dir: str, where: Placement) -> dict[str, Any]:
    """The final checkpoint of a finished run (the warmup): the weights every arm starts from."""
    status = read_status(run_dir) or {}
    state = shared_checkpoint(run_dir, where)
    if status.get("state") != RunState.COMPLETED:
        raise FileNotFoundError(f"no completed run to branch from in {run_dir} (state {status.get('state')})")
    if state is None or not state.get("final"):
        sweep_dir, name = Path(run_dir).parent.parent, status.get("name", "warmup")
        raise FileNotFoundError(
            f"the run to branch from in {run_dir} completed, but its final checkpoint is missing or "
            f"corrupt (see the warning above): rerun it with `python -m sweep.resubmit {sweep_dir} "
            f"--arms {name}` (add --local without SLURM); it resumes from its newest good checkpoint"
        )
    return state


def shared_checkpoint(run_dir: str, where: Placement) -> dict[str, Any] | None:
    """The newest valid checkpoint of `run_dir`, on every rank, verified by rank 0 alone: the
    others read the file it chose without hashing it again (6 GB at 0.5B), reading meanwhile the
    one they expect it to choose."""
    if not where.ddp:
        found = find_checkpoint(run_dir)
        return None if found is None else found[1]
    found, guess, choice = None, None, [""]
    if where.rank == 0:
        found = find_checkpoint(run_dir)
        choice = [found[0].name if found else ""]
    else:
        guess = _read_guess(run_dir)
    dist.broadcast_object_list(choice, 0)
    if where.rank == 0:
        return None if found is None else found[1]
    if not choice[0]:
        return None
    if guess is not None and guess[0].name == choice[0]:
        return guess[1]
    return load_trusted(checkpoint_dir(run_dir) / choice[0])


def _read_guess(run_dir: str) -> tuple[Path, dict[str, Any]] | None:
    path = newest_complete(run_dir)
    try:
        return None if path is None else (path, load_trusted(path))
    except Exception:  # unreadable: rank 0 will choose another one
        return None
