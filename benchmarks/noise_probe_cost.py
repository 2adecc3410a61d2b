"""What does measuring B_simple cost an arm with one batch size per step? Run by hand:

    python -m benchmarks.noise_probe_cost                  # the demo's large arm: batch 16
    python -m benchmarks.noise_probe_cost --batch 1        # the demo's small arms
    python -m benchmarks.noise_probe_cost --model qwen2_5_0_5b --seq-len 2048 --batch 8 \\
        --precision bf16 --loss-chunk 4096                 # one GPU, the 0.5B model's micro-batch

One process, no accumulation: the trainer measures the noise scale with a probe (one extra
forward and backward on the next step's samples) every `noise_probe_every` steps. This builds
the real trainer (`train.loop.Trainer`) and times its `one_step` alternately with and without a
probe, step after step, so drifting machine load hits both alike; the medians give the cost p
of a probe relative to a step, and the cost at the default interval k is p / k. (Timing whole
runs at the default interval on a 2-core VM measures mostly the VM's noise.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.trainer_speed import run_config, step_times, stepping_trainer
from train.config import TrainerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--loss-chunk", type=int, default=0)
    args = ap.parse_args()
    cfg = run_config(args.model, args.seq_len, args.batch, 0, args.precision, args.loss_chunk, False, "adamw")
    with stepping_trainer(cfg, args.steps) as trainer:

        def probe_every(k: int) -> Callable[[], None]:
            return lambda: setattr(trainer.cfg.trainer, "noise_probe_every", k)

        # Probe every step or never, alternately: `probe` fires when (step + 1) % 1 == 0.
        median = step_times(trainer, {"probe": probe_every(1), "plain": probe_every(0)}, args.steps)
    with_probe, without = median["probe"], median["plain"]
    p = with_probe / without - 1
    every = TrainerConfig().noise_probe_every
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, model {args.model}, batch {args.batch} x seq {args.seq_len}, {args.precision}")
    print(
        f"step {without * 1e3:.2f} ms, step with a probe {with_probe * 1e3:.2f} ms "
        f"(medians of {(args.steps - 20) // 2})"
    )
    print(
        f"a probe costs {p:.1%} of a step; at the default noise_probe_every={every}: "
        f"{p / every:.2%} of the arm's steps (goal <= 3%)"
    )


if __name__ == "__main__":
    main()
