"""`train(cfg)`: one run (the warmup or an arm), top to bottom.

Distributed set-up comes from the standard torch variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK); whoever launched the processes (submitit, a test) exports them. With
none set, the run is a single process. One process per device: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from train.batching import BatchPlan, plan_batches
from train.checkpoint import load_latest_checkpoint, save_checkpoint
from train.config import OPTIMIZERS, RunConfig
from train.data import TokenStream, load_meta, load_split, validation_windows
from train.invariant_adam import InvariantAdam
from train.model import TokenLoss, build_model, flops_per_token
from train.noise import NoiseScale
from train.runlog import RunLog, mark_failed, read_status
from train.schedule import layout
from train.throughput import peak_flops, peak_memory_gb

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """SIGUSR2 (SLURM's warning before a time limit or preemption) and SIGTERM only set a flag.

    Nothing is written from inside the handler: the loop reads the flag at the next step boundary,
    where model, optimizer and data position are consistent, and checkpoints there.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

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


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _branch_point(run_dir: str) -> dict[str, Any]:
    """The final checkpoint of a finished run (the warmup): the weights every arm starts from."""
    status = read_status(run_dir) or {}
    state = load_latest_checkpoint(run_dir)
    if state is None or not state.get("final") or status.get("state") != "completed":
        raise FileNotFoundError(f"no completed run to branch from in {run_dir} (state {status.get('state')})")
    return state


def _set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """The arm's own hyperparameters, also over an optimizer state carried from the branch point."""
    for group in optimizer.param_groups:
        group.update(
            lr=cfg.optimizer.lr,
            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
            eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
        )


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
    invariant: InvariantAdam | None = None,
    local_norm: LocalGradNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward over this rank's micro-batches of one step, leaving in `.grad` the
    mean gradient over every token of the global batch (times the fp16 loss scale, if `scaler`;
    `loss_scale` is its current value, read once per step by the caller).

    Gradients are all-reduced only on the last micro-batch; DDP then averages over ranks, so
    dividing each rank's token sum by (step tokens / world) gives exactly the mean over every token
    of the global batch, as one large batch would. Returns this rank's summed token loss and, on a
    single process with accumulation, the squared norm of the first micro-batch's mean gradient
    (for the noise scale; with DDP the `LocalGradNorm` hook measures the per-rank one instead).

    With `invariant` (batch-size-invariant Adam) every micro-batch's gradient is moved aside after
    its backward, so no micro-batch syncs through DDP: the optimizer reduces the gradients and the
    squared micro-batch gradients itself at the end (`InvariantAdam.finish`), and the per-rank
    norm it returns goes into `local_norm` in place of the hook's.
    """
    world = plan.world_size
    scaling = scaler is not None and scaler.is_enabled()
    micro_sq: torch.Tensor | None = None
    loss_sum = torch.zeros((), device=batch.device)
    if invariant is not None:
        invariant.begin()
    for j in range(plan.grad_accum):
        micro = batch[j * plan.micro_batch_size : (j + 1) * plan.micro_batch_size]
        sync = not ddp or (j == plan.grad_accum - 1 and invariant is None)
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
        if invariant is not None:
            invariant.add_micro()
    if invariant is not None:
        local_sq = invariant.finish(world if ddp else 1, plan.grad_accum)
        if ddp and local_norm is not None:
            local_norm.sq.copy_(local_sq)
    return loss_sum, micro_sq


@dataclass
class Counters:
    """Run totals that survive restarts (stored in every checkpoint)."""

    clipped_steps: int = 0
    device_seconds: float = 0.0  # wall time x devices, over every segment of the run


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run `cfg` to its token budget, resuming from its newest checkpoint if it has one.

    Whatever stops it, `status.json` says so: an error before training starts (bad data dir, a
    budget the split cannot hold) is recorded as `failed` just like one in the loop.
    """
    rank, world, device = _init_distributed()
    try:
        with StopFlag() as stop:
            return _train(cfg, rank, world, device, stop)
    except BaseException as exc:
        if rank == 0:
            mark_failed(cfg, f"{type(exc).__name__}: {exc}")
        raise


def _train(cfg: RunConfig, rank: int, world: int, device: torch.device, stop: StopFlag) -> dict[str, Any]:
    started = time.perf_counter()
    # --- Inputs: refuse what cannot work before any step is taken.
    meta = load_meta(cfg.data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {meta['vocab_size']} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    if cfg.precision not in DTYPES:
        raise ValueError(f"precision {cfg.precision!r}: expected one of {', '.join(DTYPES)}")
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ValueError(f"optimizer {cfg.optimizer.name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer.name == "invariant_adam" and cfg.precision == "fp16":
        raise ValueError(
            "invariant_adam does not support fp16 (its squared gradients bypass the loss scaler)"
        )
    # Every step laid out up front: its batch (which a Seesaw ramp doubles), lr factor and samples.
    lay = layout(cfg.schedule, cfg.batch_size, cfg.seq_len, cfg.token_budget)
    plans = {
        int(b): plan_batches(int(b), cfg.micro_batch_size, world, cfg.seq_len, int(b) * cfg.seq_len)
        for b in np.unique(lay.batch)
    }
    stream = TokenStream(load_split(cfg.data_dir, cfg.split), cfg.seq_len, cfg.data_seed)
    needed = lay.tokens_after(lay.steps - 1) // cfg.seq_len
    if needed > stream.n_windows:
        raise ValueError(
            f"token budget {cfg.token_budget} needs {needed} sequences but split "
            f"{cfg.split!r} holds {stream.n_windows}: lower the budget or prepare more data"
        )

    # --- Model and optimizer: the branch point's weights, a cold optimizer unless asked otherwise.
    lm = build_model(cfg.model, cfg.init_seed, cfg.attn_implementation)
    branch = _branch_point(cfg.init_checkpoint) if cfg.init_checkpoint else None
    if branch is not None:
        lm.load_state_dict(branch["model"])
    lm.to(device)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer.name == "invariant_adam":
        optimizer = InvariantAdam(lm.parameters())
    else:
        optimizer = torch.optim.AdamW(lm.parameters(), fused=device.type == "cuda")
    invariant = optimizer if isinstance(optimizer, InvariantAdam) else None
    if branch is not None and cfg.carry_optimizer:
        optimizer.load_state_dict(branch["optimizer"])
    _set_hyperparameters(optimizer, cfg)
    dtype = DTYPES[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    noise = NoiseScale(cfg.noise_scale_decay)
    counters = Counters()

    # --- Resume: everything that decides the next step comes back from the newest valid checkpoint.
    start_step = 0
    resumed = load_latest_checkpoint(cfg.run_dir)
    if resumed is not None:
        lm.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        noise.load_state_dict(resumed["noise_scale"])
        counters = Counters(**resumed["counters"])
        rng = resumed["rng"]
        _set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        start_step = resumed["step"]
        expected = (int(lay.phase[start_step - 1]), lay.tokens_after(start_step - 1) // cfg.seq_len)
        if (resumed.get("phase", 0), resumed["samples"]) != expected:
            raise ValueError(
                f"checkpoint at step {start_step} is at phase/sample {resumed.get('phase', 0)}/"
                f"{resumed['samples']} but this run's schedule puts that step at {expected[0]}/{expected[1]}"
            )

    ddp = world > 1
    net: torch.nn.Module = TokenLoss(lm, cfg.loss_chunk_tokens)
    local_norm = LocalGradNorm(device)
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net)
        net.register_comm_hook(local_norm, LocalGradNorm.hook)  # type: ignore[arg-type]
    evaluator = TokenLoss(lm, cfg.loss_chunk_tokens)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]

    def b_small(plan: BatchPlan) -> int:
        """Noise-scale estimate: per-rank (DDP) or first-micro-batch (one process) vs the global gradient."""
        return plan.batch_size // world if ddp else plan.micro_batch_size if plan.grad_accum > 1 else 0

    def autocast() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # Rows a killed earlier attempt logged past its last checkpoint (all of them, if it had none) are
    # superseded by what this attempt logs.
    log = RunLog(cfg, lay.steps, start_step if resumed is not None else -1) if rank == 0 else None
    val = torch.from_numpy(
        validation_windows(load_split(cfg.data_dir, "validation"), cfg.seq_len, cfg.val_samples)
    ).to(device)
    previous_val: list[float] = []

    def validate(step: int) -> None:
        # Every rank evaluates its share of the fixed validation slice; the sums are all-reduced,
        # so all ranks know the result and a broken measurement stops them all at once.
        evaluator.eval()
        total = torch.zeros((), device=device)
        mine = val[rank * len(val) // world : (rank + 1) * len(val) // world]
        with torch.no_grad(), autocast():
            eval_batch = plans[cfg.batch_size].micro_batch_size
            for i in range(0, len(mine), eval_batch):
                total += evaluator(mine[i : i + eval_batch]).float()
        evaluator.train()
        if ddp:
            dist.all_reduce(total)
        val_loss = total.item() / (val.size(0) * cfg.seq_len)
        if log is not None:
            log.log({"step": step, "tokens": lay.tokens_after(step - 1), "val_loss": val_loss})
        if not math.isfinite(val_loss) or val_loss <= 0:
            raise BadValidation(f"validation loss {val_loss} at step {step}: the measurement is broken")
        if previous_val and val_loss == previous_val[-1]:
            raise BadValidation(
                f"validation loss unchanged ({val_loss}) from the previous evaluation to step {step}: "
                "the weights are not being updated"
            )
        previous_val.append(val_loss)

    def checkpoint(step: int, final: bool) -> None:
        # Every rank's RNG state (one gather), so that a resumed rank continues its own streams.
        rngs: list[Any] = [None] * world
        if ddp:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if rank == 0:
            state = {
                "model": lm.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "noise_scale": noise.state_dict(),
                "counters": asdict(counters),
                "step": step,
                "tokens": lay.tokens_after(step - 1),
                "samples": lay.tokens_after(step - 1) // cfg.seq_len,  # data position: the next sample
                "phase": int(lay.phase[step - 1]),  # schedule position (halvings / Seesaw doublings passed)
                "lr": lr_at(step - 1),
                "rng": rngs,
                "final": final,
                "signature": cfg.signature,
                "wandb_id": log.wandb_id if log is not None else None,
            }
            save_checkpoint(cfg.run_dir, step, state, cfg.keep_checkpoints)

    def lr_at(step: int) -> float:
        """The schedule's lr for step `step`, after a linear ramp counted in tokens (batch-size invariant)."""
        lr = cfg.optimizer.lr * float(lay.lr_factor[step])
        if cfg.lr_warmup_tokens <= 0:
            return lr
        return lr * min(1.0, lay.tokens_after(step) / cfg.lr_warmup_tokens)

    def crossed(done: int, every_tokens: int) -> bool:
        """Whether the `done`-th step crossed a multiple of `every_tokens`."""
        if every_tokens <= 0:
            return False
        return lay.tokens_after(done - 1) // every_tokens > lay.tokens_after(done - 2) // every_tokens

    if start_step == 0:
        validate(0)
    params = [p for p in lm.parameters() if p.requires_grad]
    flops = flops_per_token(lm, cfg.seq_len)
    peak = peak_flops(device, cfg.precision, cfg.peak_flops)
    bar = None
    if log is not None and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.token_budget,
            initial=lay.tokens_after(start_step - 1),
            desc=cfg.name,
            unit="tok",
            unit_scale=True,
        )
    window_time, window_tokens = time.perf_counter(), 0
    step_end = started  # device time counts from start-up: the devices are held all along
    try:
        # --- The loop: one optimizer step per global batch, stopping only at step boundaries.
        for step in range(start_step, lay.steps):
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            plan = plans[int(lay.batch[step])]
            rows = stream.rank_slice(int(lay.offset[step]), plan.batch_size, rank, world)
            batch = torch.from_numpy(rows).to(device)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            local_norm.sq.zero_()
            loss_sum, micro_sq = accumulate_gradients(
                net, batch, plan, ddp, autocast, scaler, scale, invariant, local_norm
            )
            scaler.unscale_(optimizer)  # a no-op unless fp16
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)  # before clipping
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            signum = stop.signum
            small_sq = micro_sq
            if ddp:
                # One collective per step: the loss sum, whether any rank was asked to stop (so every
                # rank stops at the same step, whichever got the signal) and the per-rank gradient norms.
                flags = torch.tensor([signum == signal.SIGUSR2, signum == signal.SIGTERM], device=device)
                packed = torch.cat([loss_sum.float()[None], flags.float(), (local_norm.sq / scale**2)[None]])
                dist.all_reduce(packed)
                loss_sum, small_sq = packed[0], packed[3] / world
                signum = signal.SIGUSR2 if packed[1] > 0 else signal.SIGTERM if packed[2] > 0 else 0
            loss = loss_sum.item() / plan.tokens_per_step
            done = step + 1
            if not math.isfinite(loss):
                raise Diverged(f"loss {loss} at step {done}")
            norm = grad_norm.item()
            if math.isfinite(norm):  # an fp16 overflow step was skipped: no gradient to judge
                counters.clipped_steps += norm > cfg.optimizer.grad_clip
                if small_sq is not None:
                    noise.update(small_sq.item(), b_small(plan), norm**2, plan.batch_size)
            now = time.perf_counter()
            counters.device_seconds += (now - step_end) * world
            step_end = now

            window_tokens += plan.tokens_per_step
            if log is not None:
                tokens_per_s = window_tokens / max(now - window_time, 1e-9)
                tokens = lay.tokens_after(step)
                if done % cfg.log_every_steps == 0 or done == lay.steps:
                    row: dict[str, Any] = {
                        "step": done,
                        "tokens": tokens,
                        "loss": loss,
                        "lr": lr,
                        "beta1": cfg.optimizer.beta1,
                        "beta2": cfg.optimizer.beta2,
                        "batch_size": plan.batch_size,
                        "grad_norm": norm,
                        "clip_fraction": counters.clipped_steps / done,
                        "b_simple": noise.b_simple,
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops * tokens_per_s / (peak * world) if peak else None,
                        "peak_mem_gb": peak_memory_gb(device),
                        "gpu_hours": counters.device_seconds / 3600,
                    }
                    if scaler.is_enabled():
                        row["loss_scale"] = scale
                    log.log({k: v for k, v in row.items() if v is not None})
                log.update(step=done, tokens=tokens, loss=loss, tokens_per_s=tokens_per_s)
                if bar is not None:
                    bar.update(plan.tokens_per_step)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if now - window_time > 10.0:
                    window_time, window_tokens = now, 0
            if crossed(done, cfg.val_every_tokens) and done < lay.steps:
                validate(done)
            stopping = bool(signum) and done < lay.steps
            if stopping or (crossed(done, cfg.checkpoint_every_tokens) and done < lay.steps):
                checkpoint(done, final=False)
            if stopping:
                raise Stopped(signum, done)
        if resumed is None or not resumed.get("final"):
            validate(lay.steps)
            checkpoint(lay.steps, final=True)
    except Diverged as exc:
        if log is not None:
            log.close("diverged", str(exc))
        raise
    except Stopped as exc:
        if log is not None:
            log.close("stopped", str(exc))
        raise
    except BaseException as exc:
        if log is not None:
            log.close("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if bar is not None:
            bar.close()
    summary = {"name": cfg.name, "signature": cfg.signature, "steps": lay.steps, "tokens": cfg.token_budget}
    if log is not None:
        log.close("completed")
    if ddp:
        dist.barrier()
    return summary
