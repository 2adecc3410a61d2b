"""What do per-example gradient statistics cost a step? Run by hand:

    python -m benchmarks.per_example_cost                   # CPU, tiny model, batch 8: micro 1, 4, 8
    python -m benchmarks.per_example_cost --model qwen2_5_0_5b --seq-len 2048 --batch 8 \\
        --micro 8 --precision bf16 --loss-chunk 4096        # one GPU, the 0.5B model

For each micro-batch size it builds the real trainer (`train.loop.Trainer`, AdamW, the fused loss
where --loss-chunk is set) and times its `one_step` under five setups taking turns step after step
(`trainer_speed.step_times`):
  off          plain AdamW;
  seq norms    per-sequence norms, exact B_simple and per-group SNR (`trainer.per_example_stats`);
  seq full     the same plus the elementwise M2 MicroAdam feeds its second moment (the optimizer
               stays AdamW, so the difference is the statistics' work alone);
  token norms  / token full: the same with `trainer.per_example_unit=token`.
The per-unit gradients are formed inside the backward (train/unit_backward.py). Goals: seq norms
<= 10% at micro 8, seq full <= 15%, token norms <= 3%. Then, on a GPU, the peak memory of each
setup against off (goal: <= 10% more at micro 8).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.trainer_speed import run_config, step_times, stepping_trainer
from train.loop import Trainer, Units
from train.model import TokenLoss, parameter_groups
from train.per_example import UnitGradients
from train.unit_backward import UnitCollector, install

SETUPS = {"off": None, "seq norms": ("sequence", False), "seq full": ("sequence", True)}
SETUPS |= {"token norms": ("token", False), "token full": ("token", True)}


def switches(trainer: Trainer) -> dict[str, Callable[[], None]]:
    """A function per setup that switches the trainer's network to it (outside the timed step)."""
    network = trainer.network
    loss = network.net
    assert isinstance(loss, TokenLoss)  # one process: the module itself
    by_id = parameter_groups(loss)
    groups = [by_id[id(p)] for p in network.params]

    def setup(how: tuple[str, bool] | None) -> Callable[[], None]:
        units = None
        if how is not None:
            unit, squares = how
            units = Units(UnitGradients(network.params, groups, squares, False))
            units.collector = UnitCollector(units.sums, loss, unit, trainer.cfg.trainer.seq_len)

        def switch() -> None:
            for module in loss.modules():  # the plain forwards, then this setup's
                module.__dict__.pop("forward", None)
            if units is not None and units.collector is not None:
                install(loss, units.collector)
            network.units = units
            loss.units = None if units is None else units.collector

        return switch

    return {name: setup(how) for name, how in SETUPS.items()}


def costs(args: argparse.Namespace, micro: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time per setup, and on a GPU its peak memory in GB (one step, after the rest)."""
    cfg = run_config(
        args.model, args.seq_len, args.batch, micro, args.precision, args.loss_chunk, False, "adamw"
    )
    if args.loss_chunk:
        cfg.trainer.loss_kernel = "fused"
    with stepping_trainer(cfg, args.steps + len(SETUPS)) as trainer:
        setups = switches(trainer)
        times = step_times(trainer, setups, args.steps)
        peaks: dict[str, float] = {}
        if trainer.where.device.type == "cuda":
            for i, (name, switch) in enumerate(setups.items()):
                switch()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                trainer.one_step(args.steps + i)
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 1e9
        return times, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument(
        "--loss-chunk", type=int, default=0, help="tokens per chunk of the fused loss (0: the full loss)"
    )
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, model {args.model}, batch {args.batch} x seq {args.seq_len}, {args.precision}")
    print("micro  " + "  ".join(f"{name:>20}" for name in SETUPS))
    for micro in args.micro:
        times, peaks = costs(args, micro)
        cells = [f"{times['off'] * 1e3:17.1f} ms"] + [
            f"{times[n] * 1e3:7.1f} ms ({times[n] / times['off'] - 1:+6.1%})" for n in list(SETUPS)[1:]
        ]
        print(f"{micro:5d}  " + "  ".join(f"{c:>20}" for c in cells))
        if peaks:
            print(
                "  peak "
                + "  ".join(f"{peaks[n]:8.2f} GB ({peaks[n] / peaks['off'] - 1:+6.1%})" for n in SETUPS)
            )


if __name__ == "__main__":
    main()
