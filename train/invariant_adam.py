"""Batch-size-invariant Adam (Wang & Aitchison 2024, arXiv:2402.18824).

Standard Adam feeds its second moment the square of the mini-batch gradient, whose expectation
|G|^2 + sigma^2 / B depends on the batch size B. Here the second moment is fed the mean over
micro-batches of each micro-batch gradient squared, whose expectation |G|^2 + sigma^2 / b depends
only on the micro-batch size b. With b fixed, a mini-batch of kappa micro-batches at lr kappa x eta
and betas beta^kappa then takes, for small eta (and 1 - beta of the order of eta), the step that
kappa steps of the same optimizer on the micro-batches alone would take (the paper's Theorem 1):
learning curves against tokens do not depend on the batch size, with lr proportional to batch.

Micro-batches are the per-rank, per-accumulation-step batches, so their size (trainer.micro_batch_size)
is part of an arm's identity. The trainer drives it in three calls per step:

    opt.begin()                       # before the first micro-batch
    ...backward(); opt.add_micro()    # after every micro-batch's backward (moves .grad aside)
    opt.finish(world, grad_accum)     # .grad = mean gradient; squared micro-gradients reduced

Each micro-batch's backward leaves in `.grad` its contribution to the mean gradient over the
rank's tokens, c_i = g_i / grad_accum (g_i the micro-batch mean gradient). The second-moment input
is mean_i g_i^2 over all world x grad_accum micro-batches = (grad_accum / world) x sum_i c_i^2 with
the sum over every rank: one all-reduce of the gradients (mean) and of the squared sums (sum), in
one flat buffer. Its cost is that extra buffer and reduction (twice the bytes of the gradient
all-reduce), and two parameter-sized buffers per rank.

Gradient clipping, where it fires, scales `.grad` (the first moment's input) but not the squared
micro-gradients; the studies keep clipping off (trainer.grad_clip = 1e9). fp16 is refused: the
squared gradients would carry the loss scale squared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


class InvariantAdam(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose second moment averages the
    squared micro-batch gradients instead of squaring their average."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        # Per-step accumulators, not optimizer state: they are empty between steps, so they stay
        # out of checkpoints.
        self._sum: dict[torch.Tensor, torch.Tensor] = {}
        self._sq: dict[torch.Tensor, torch.Tensor] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def begin(self) -> None:
        for p in self._params():
            self._sum[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._sq[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
            p.grad = None

    def add_micro(self) -> None:
        """Take the micro-batch's gradient contribution out of `.grad` into the two sums."""
        params = [p for p in self._params() if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]  # all of them: the filter is for mypy
        torch._foreach_add_([self._sum[p] for p in params], grads)
        torch._foreach_addcmul_([self._sq[p] for p in params], grads, grads)
        for p in params:
            p.grad = None

    def finish(self, world: int, grad_accum: int) -> torch.Tensor:
        """Set `.grad` to the global mean gradient and the second-moment input to the mean squared
        micro-batch gradient (reducing over ranks when `world` > 1). Returns this rank's squared
        gradient norm before the reduction (the small-batch half of the noise-scale estimate)."""
        params = [p for p in self._params() if p in self._sum]
        norms = torch._foreach_norm([self._sum[p] for p in params])  # no copy of the gradients
        local_sq = torch.linalg.vector_norm(torch.stack(norms).float()) ** 2
        if world > 1:
            flat = torch.cat(
                [self._sum[p].flatten() / world for p in params] + [self._sq[p].flatten() for p in params]
            )
            dist.all_reduce(flat)
            offset = 0
            for part in (self._sum, self._sq):
                for p in params:
                    n = p.numel()
                    part[p].copy_(flat[offset : offset + n].view_as(p))
                    offset += n
        for p in params:
            p.grad = self._sum.pop(p)
            self.state[p]["micro_sq"] = self._sq.pop(p).mul_(grad_accum / world)
        return local_sq

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("InvariantAdam takes no closure: the trainer feeds it micro-batch gradients")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "micro_sq" not in state:
                    raise RuntimeError("InvariantAdam.step() needs begin() / add_micro() / finish() first")
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).add_(state.pop("micro_sq"), alpha=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
