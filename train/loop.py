"""`train(cfg)`: one run (the warmup or an arm), top to bottom.

Distributed set-up comes from the standard torch variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK); whoever launched the processes (submitit, a test) exports them. With
none set, the run is a single process.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.batching import plan_batches
from train.checkpoint import load_latest_checkpoint, save_checkpoint
from train.config import RunConfig
from train.data import TokenStream, load_meta, load_split, validation_windows
from train.model import build_model, token_loss_sum
from train.runlog import RunLog, mark_failed, read_status


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def _load_branch_weights(model: torch.nn.Module, run_dir: str) -> None:
    """Weights of a finished run (the warmup): the branch point every arm starts from."""
    status = read_status(run_dir) or {}
    state = load_latest_checkpoint(run_dir)
    if state is None or not state.get("final") or status.get("state") != "completed":
        raise FileNotFoundError(f"no completed run to branch from in {run_dir} (state {status.get('state')})")
    model.load_state_dict(state["model"])


def _evaluate(model: torch.nn.Module, windows: torch.Tensor, micro: int, autocast: Any) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(0, len(windows), micro):
            loss_sum, n = token_loss_sum(model, windows[i : i + micro])
            total += loss_sum.item()
            count += n
    model.train()
    return total / count


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
    meta = load_meta(cfg.data_dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {meta['vocab_size']} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    plan = plan_batches(cfg.batch_size, cfg.micro_batch_size, world, cfg.seq_len, cfg.token_budget)
    stream = TokenStream(load_split(cfg.data_dir, cfg.split), cfg.seq_len, cfg.data_seed)
    if plan.steps * cfg.batch_size > stream.n_windows:
        raise ValueError(
            f"token budget {cfg.token_budget} needs {plan.steps * cfg.batch_size} sequences but split "
            f"{cfg.split!r} holds {stream.n_windows}: lower the budget or prepare more data"
        )

    model = build_model(cfg.model, cfg.init_seed)
    if cfg.init_checkpoint:
        _load_branch_weights(model, cfg.init_checkpoint)
    model.to(device)
    # A cold optimizer: branching copies weights only, so every arm's Adam moments start at zero.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optimizer.lr,
        betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    start_step = 0
    resumed = load_latest_checkpoint(cfg.run_dir)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        _set_rng_state(resumed["rng"])
        start_step = resumed["step"]
    ddp = world > 1
    net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.precision]

    def autocast() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    log = RunLog(cfg, plan.steps, start_step) if rank == 0 else None
    val = torch.from_numpy(
        validation_windows(load_split(cfg.data_dir, "validation"), cfg.seq_len, cfg.val_samples)
    ).to(device)

    def validate(step: int) -> None:
        if log is not None:
            val_loss = _evaluate(model, val, plan.micro_batch_size, autocast)
            log.log({"step": step, "tokens": step * plan.tokens_per_step, "val_loss": val_loss})

    def checkpoint(step: int, final: bool) -> None:
        if rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "tokens": step * plan.tokens_per_step,
                "rng": _rng_state(),
                "final": final,
                "signature": cfg.signature,
            }
            save_checkpoint(cfg.run_dir, step, state, cfg.keep_checkpoints)

    def crossed(step: int, every_tokens: int) -> bool:
        return (
            every_tokens > 0
            and (step * plan.tokens_per_step) // every_tokens
            > ((step - 1) * plan.tokens_per_step) // every_tokens
        )

    if start_step == 0:
        validate(0)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if log is not None and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.token_budget,
            initial=start_step * plan.tokens_per_step,
            desc=cfg.name,
            unit="tok",
            unit_scale=True,
        )
    window_time, window_tokens = time.perf_counter(), 0
    try:
        for step in range(start_step, plan.steps):
            tokens_before = step * plan.tokens_per_step
            lr = cfg.optimizer.lr
            if cfg.lr_warmup_tokens > 0:
                lr *= min(1.0, (tokens_before + plan.tokens_per_step) / cfg.lr_warmup_tokens)
            for group in optimizer.param_groups:
                group["lr"] = lr

            batch = torch.from_numpy(stream.rank_batch(step, cfg.batch_size, rank, world)).to(device)
            loss_sum = torch.zeros((), device=device)
            for j in range(plan.grad_accum):
                micro = batch[j * plan.micro_batch_size : (j + 1) * plan.micro_batch_size]
                # Gradients are all-reduced only on the last micro-batch; DDP then averages over
                # ranks, so dividing each rank's token sum by (step tokens / world) gives exactly
                # the mean over every token of the global batch.
                sync = not ddp or j == plan.grad_accum - 1
                with contextlib.nullcontext() if sync else net.no_sync(), autocast():  # type: ignore[operator]
                    part, _ = token_loss_sum(net, micro)
                (part * world / plan.tokens_per_step).backward()
                loss_sum += part.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            signum = stop.signum
            if ddp:
                # One collective per step: the loss sum and whether any rank was asked to stop, so
                # that every rank stops at the same step, whichever got the signal.
                packed = torch.tensor(
                    [0.0, signum == signal.SIGUSR2, signum == signal.SIGTERM], device=device
                )
                packed[0] = loss_sum
                dist.all_reduce(packed)
                loss_sum = packed[0]
                signum = signal.SIGUSR2 if packed[1] > 0 else signal.SIGTERM if packed[2] > 0 else 0
            loss = loss_sum.item() / plan.tokens_per_step
            done = step + 1
            if not math.isfinite(loss):
                raise Diverged(f"loss {loss} at step {done}")

            window_tokens += plan.tokens_per_step
            if log is not None:
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_time, 1e-9)
                if done % cfg.log_every_steps == 0 or done == plan.steps:
                    row = {"step": done, "tokens": done * plan.tokens_per_step, "loss": loss, "lr": lr}
                    row.update(
                        grad_norm=grad_norm.item(), batch_size=cfg.batch_size, tokens_per_s=tokens_per_s
                    )
                    log.log(row)
                log.update(
                    step=done, tokens=done * plan.tokens_per_step, loss=loss, tokens_per_s=tokens_per_s
                )
                if bar is not None:
                    bar.update(plan.tokens_per_step)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if now - window_time > 10.0:
                    window_time, window_tokens = now, 0
            if crossed(done, cfg.val_every_tokens) and done < plan.steps:
                validate(done)
            stopping = bool(signum) and done < plan.steps
            if stopping or (crossed(done, cfg.checkpoint_every_tokens) and done < plan.steps):
                checkpoint(done, final=False)
            if stopping:
                raise Stopped(signum, done)
        if resumed is None or not resumed.get("final"):
            validate(plan.steps)
            checkpoint(plan.steps, final=True)
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
    summary = {"name": cfg.name, "signature": cfg.signature, "steps": plan.steps, "tokens": cfg.token_budget}
    if log is not None:
        log.close("completed")
    if ddp:
        dist.barrier()
    return summary
