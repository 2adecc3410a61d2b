"""Is our trainer as fast as a bare training loop? Run by hand:

    python -m benchmarks.trainer_speed                      # CPU, tiny model (goal: ratio >= 0.97)
    python -m benchmarks.trainer_speed --micro-batch 2 --optimizer invariant_adam
                                                            # the cost of batch-size-invariant Adam
    python -m benchmarks.trainer_speed --model qwen2_5_0_5b --seq-len 2048 --batch 8 \\
        --precision bf16 --loss-chunk 4096 [--compile]      # one GPU (goal: MFU >= 45% on an H100)

In one process it trains the same model (built from `conf/model/<model>.yaml`) on the same token
stream (the embedded corpus, prepared as `python -m sweep` would) with
  (a) `train.loop.train`, everything on (loss check, grad norm, noise scale, metrics file, status
      heartbeat, clip), W&B disabled; and
  (b) a bare PyTorch + transformers loop written here doing the same work: the same micro-batches
      and accumulation, the same loss normalisation (token sum / step tokens), the gradient norm
      and clip, AdamW, the loss and norm read at the same logging cadence; nothing else.
The noise probe is off in (a) (its cost: benchmarks/noise_probe_cost.py).
Each is timed at `steps` and `2 x steps` steps and the difference is used, so start-up,
validation and the final checkpoint (fixed costs of a run) cancel. Rounds alternate the two, and
the ratio is taken within each round (adjacent in time, so drifting machine load hits both alike);
the median round is reported with the spread. Prints tokens/s of each, their ratio, and our MFU
where the device's peak is known (PaLM's convention: see train/model.py).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from train.adam_variants import VariantAdam
from train.config import DataConfig, ModelConfig, OptimizerConfig, RunConfig, TrainerConfig, WandbConfig
from train.data import TokenStream, load_split, prepare
from train.distributed import init_distributed
from train.loop import DTYPES, StopFlag, Trainer, train
from train.model import TokenLoss, build_model
from train.per_example import UnitGradients
from train.throughput import peak_flops
from train.unit_backward import UnitCollector, install

REPO = Path(__file__).resolve().parent.parent


def ours(cfg: RunConfig, steps: int) -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    cfg.run_dir, cfg.token_budget = str(run_dir), steps * cfg.batch_size * cfg.trainer.seq_len
    start = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(run_dir)
    return elapsed


def bare(cfg: RunConfig, steps: int, device: torch.device) -> float:
    """The trainer's work written plainly: the same samples, micro-batches and accumulation, the
    loss summed over tokens and divided by the step's tokens (the mean over every token of the
    batch), the gradient norm and clip, AdamW (fused on a GPU, as the trainer), and the loss and
    norm read to the host at the trainer's logging cadence. Nothing else. With invariant Adam or
    per-example statistics, the same per-unit sums the trainer keeps (train/per_example.py's
    `UnitGradients`, formed inside the backward by train/unit_backward.py's `UnitCollector`) and,
    for the statistics, their figures read every logged step."""
    stream = TokenStream(load_split(cfg.data_dir, cfg.split), cfg.trainer.seq_len, cfg.trainer.data_seed)
    loss_module = TokenLoss(build_model(cfg.model, 0, cfg.trainer.attn_implementation).to(device))
    model = loss_module.lm
    named = [(n, p) for n, p in loss_module.named_parameters() if p.requires_grad]
    params, names = [p for _, p in named], [n for n, _ in named]
    o, t = cfg.optimizer, cfg.trainer
    hyper = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    invariant = o.name == "invariant_adam"
    opt: torch.optim.Optimizer = (
        VariantAdam(params, o.name, **hyper)  # type: ignore[arg-type]
        if invariant
        else torch.optim.AdamW(params, fused=device.type == "cuda", **hyper)  # type: ignore[arg-type]
    )
    units = UnitGradients(params, names, invariant, False, t.per_example_stats) if cfg.unit_moments else None
    collector = None
    if units is not None and t.per_example_stats:
        collector = UnitCollector(units, loss_module, t.per_example_unit, t.seq_len)
        install(loss_module, collector)
        loss_module.units = collector
    dtype = DTYPES[cfg.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    micro = t.micro_batch_size or cfg.batch_size
    accum = cfg.batch_size // micro
    step_tokens = cfg.batch_size * t.seq_len
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.from_numpy(stream.samples(step * cfg.batch_size, cfg.batch_size)).to(device)
        loss_sum = torch.zeros((), device=device)
        if units is not None:
            units.begin()
        for j in range(0, cfg.batch_size, micro):
            part = batch[j : j + micro]
            if collector is not None:
                loss_sum += collector.micro_batch(part, lambda: autocast)
                continue
            with autocast:
                logits = model(input_ids=part[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), part[:, 1:].flatten(), reduction="sum"
            )
            (loss / step_tokens).backward()
            loss_sum += loss.detach()
            if units is not None:
                units.add_grads(factor=accum)
        moments = units.finish(1)[0] if units is not None else None
        if isinstance(opt, VariantAdam) and moments is not None:
            opt.feed(moments)
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % t.log_every_steps == 0:
            (loss_sum / step_tokens).item(), norm.item()
            if moments is not None and t.per_example_stats:
                moments.statistics()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_config(
    model: str,
    seq_len: int,
    batch: int,
    micro_batch: int,
    precision: str,
    loss_chunk: int,
    compile: bool,
    optimizer: str,
    per_example_stats: bool = False,
) -> RunConfig:
    """The benchmarked run: `conf/model/<model>.yaml` on the embedded corpus, W&B disabled."""
    values = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    data_dir = prepare(DataConfig(cache_dir=str(REPO / "sweeps" / "data")))
    return RunConfig(
        name="bench",
        stage="arm",
        signature="bench",
        run_dir="",
        data_dir=str(data_dir),
        model=ModelConfig(**values),
        optimizer=OptimizerConfig(name=optimizer, lr=1e-4),
        batch_size=batch,
        token_budget=0,
        trainer=TrainerConfig(
            seq_len=seq_len,
            micro_batch_size=micro_batch,
            compile=compile,
            loss_chunk_tokens=loss_chunk,
            noise_probe_every=0,  # the probe's cost is benchmarks/noise_probe_cost.py's
            per_example_stats=per_example_stats,
        ),
        precision=precision,
        wandb=WandbConfig(mode="disabled"),
    )


@contextlib.contextmanager
def stepping_trainer(cfg: RunConfig, steps: int) -> Iterator[Trainer]:
    """The real trainer on `cfg` with room for `steps` steps in a temporary run dir, built (its
    first evaluation not run) for timing `one_step`."""
    cfg = replace(
        cfg,
        run_dir=tempfile.mkdtemp(prefix="bench-"),
        token_budget=(steps + 2) * cfg.batch_size * cfg.trainer.seq_len,
        progress=False,
    )
    try:
        with StopFlag() as stop:
            yield Trainer(cfg, init_distributed(cfg.trainer.device), stop)
    finally:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


def step_times(
    trainer: Trainer, setups: dict[str, Callable[[], None]], steps: int, settle: int = 20
) -> dict[str, float]:
    """Median time of `trainer.one_step` under each setup (a function that switches the trainer to
    it), the setups taking turns step after step so that drifting machine load hits all alike;
    the first `settle` steps (allocations, caches) are not counted."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    cuda = trainer.where.device.type == "cuda"
    for step in range(steps):
        name = names[step % len(names)]
        setups[name]()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.one_step(step)
        if cuda:
            torch.cuda.synchronize()
        if step >= settle:
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=list(DTYPES))
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "invariant_adam"])
    ap.add_argument("--per-example-stats", action="store_true", help="per-sequence gradient statistics on")
    args = ap.parse_args()

    cfg = run_config(
        args.model,
        args.seq_len,
        args.batch,
        args.micro_batch,
        args.precision,
        args.loss_chunk,
        args.compile,
        args.optimizer,
        args.per_example_stats,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.steps * args.batch * args.seq_len
    rounds = []
    for _ in range(args.repeats):
        t_ours = ours(cfg, 2 * args.steps) - ours(cfg, args.steps)
        t_bare = bare(cfg, 2 * args.steps, device) - bare(cfg, args.steps, device)
        if t_ours <= 0 or t_bare <= 0:  # the longer run was not longer: the machine's load changed
            print(f"round discarded: time differences {t_ours:.2f} s (ours), {t_bare:.2f} s (bare)")
            continue
        rounds.append((tokens / t_ours, tokens / t_bare))
    if not rounds:
        raise SystemExit("every round was discarded: run on an idle machine")
    rounds.sort(key=lambda r: r[0] / r[1])
    rate_ours, rate_bare = rounds[len(rounds) // 2]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    stats = ", per-example statistics" if args.per_example_stats else ""
    print(
        f"device {device_name}, model {args.model}, batch {args.batch} x seq {args.seq_len}, "
        f"{args.precision}, {args.optimizer}{stats}, threads {torch.get_num_threads()}, {len(rounds)} rounds"
    )
    print(f"bare loop   {rate_bare:12,.0f} tokens/s   (median round)")
    print(f"our trainer {rate_ours:12,.0f} tokens/s")
    ratios = [o / b for o, b in rounds]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(
        f"ratio ours/bare {rate_ours / rate_bare:.3f}  (median of {len(ratios)} paired rounds; goal >= 0.97)"
    )
    print(
        f"spread: min {min(ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
        f"max {max(ratios):.3f}"
    )
    print("ratio per round: " + " ".join(f"{r:.3f}" for r in ratios))
    peak = peak_flops(device, args.precision)
    if peak:
        flops = cfg.model.flops_per_token(args.seq_len)
        print(f"MFU (ours) {flops * rate_ours / peak:.1%}  (goal >= 45% on an H100)")


if __name__ == "__main__":
    main()
