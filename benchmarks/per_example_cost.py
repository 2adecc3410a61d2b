"""What do per-example gradient statistics cost a step? Run by hand:

    python -m benchmarks.per_example_cost                   # CPU, tiny model, batch 8: micro 1, 4, 8
    python -m benchmarks.per_example_cost --model qwen2_5_0_5b --seq-len 2048 --batch 8 \\
        --micro 1 --precision bf16                          # one GPU, the 0.5B model

For each micro-batch size it builds the real trainer (`train.loop.Trainer`, AdamW) and times its
`one_step` under three setups taking turns step after step (`trainer_speed.step_times`):
  off    plain AdamW;
  stats  per-example norms, exact B_simple and per-group SNR (`trainer.per_example_stats`): the
         per-sequence gradients and their norms;
  full   the same plus the elementwise sums of squares MicroAdam feeds its second moment (the
         optimizer stays AdamW, so the difference is the statistics' work alone).
At micro-batch 1 each micro-batch's backward is its sequence's gradient; above it, torch.func
vmap forms them inside the micro-batch (train/per_example.py). Goal: stats <= 10% at micro 8.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.trainer_speed import run_config, step_times, stepping_trainer
from train.loop import Units
from train.per_example import UnitGradients, per_example_gradients


def costs(args: argparse.Namespace, micro: int) -> dict[str, float]:
    cfg = run_config(args.model, args.seq_len, args.batch, micro, args.precision, 0, False, "adamw")
    with stepping_trainer(cfg, args.steps) as trainer:
        network = trainer.network
        named = [(n, p) for n, p in network.net.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        examples = per_example_gradients(network.net, names, cfg.trainer.seq_len)

        def setup(squares: bool | None) -> Callable[[], None]:
            units = (
                None
                if squares is None
                else Units(UnitGradients(network.params, names, squares, False), examples)
            )

            def switch() -> None:
                network.units, network.per_sequence = units, units is not None

            return switch

        setups = {"off": setup(None), "stats": setup(False), "full": setup(True)}
        return step_times(trainer, setups, args.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, model {args.model}, batch {args.batch} x seq {args.seq_len}, {args.precision}")
    print("micro  off ms  stats ms (cost)  full ms (cost)")
    for micro in args.micro:
        t = costs(args, micro)
        print(
            f"{micro:5d}  {t['off'] * 1e3:6.1f}  {t['stats'] * 1e3:8.1f} ({t['stats'] / t['off'] - 1:+.1%})"
            f"  {t['full'] * 1e3:7.1f} ({t['full'] / t['off'] - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
