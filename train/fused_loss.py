"""The LM head and the summed cross-entropy as one autograd function, with nothing recomputed.

The chunked loss (`TokenLoss` with `loss_chunk_tokens`) keeps one chunk's logits alive by
recomputing each chunk's head matmul in backward: 2·N·V·d extra FLOPs per step (+7.8% at
Qwen2.5-0.5B, seq 2048), which MFU does not count, and a second pass over the fp32 logits. Here
each chunk is done once, in the forward:

    logits = h W^T (+ b)                         in the compute dtype (autocast's, else W's)
    loss  += sum_t logsumexp(z_t) - z_t[y_t]      with z = logits in fp32
    dz     = softmax(z) - onehot(y)               in fp32, then the compute dtype
    dh     = dz W,   dW += dz^T h,   db += sum_t dz_t

and the backward only scales dh, dW, db by the incoming gradient (the loss's weight in the step:
1 / tokens, the fp16 loss scale). One chunk's fp32 logits (chunk x V) are alive at a time, reused
in place for the softmax; dh is one (N, d) tensor like the hidden states themselves.

The rounding follows the chunked loss step for step (the same matmuls in the same dtype, dz cast
to the compute dtype before the two gradient matmuls, dW accumulated in W's dtype), so the two
agree to float rounding (tests/test_fused_loss.py); `trainer.loss_kernel` chooses between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FusedLinearCrossEntropy(torch.autograd.Function):
    """`apply(hidden (N, d), weight (V, d), bias (V,) or None, targets (N,), chunk, dtype,
    elementwise, units)` -> the summed cross-entropy of the N tokens, a float32 scalar.
    `elementwise` is `loss_and_logit_gradient` or its compiled form (`trainer.compile`); `units`,
    where per-unit gradients are formed (train/unit_backward.py), takes each chunk's (h, dz, first
    row) in place of the weight's gradient, which is then not formed here."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        dtype: torch.dtype,
        elementwise: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        units: Callable[[torch.Tensor, torch.Tensor, int], None] | None,
    ) -> torch.Tensor:
        n = hidden.size(0)
        step = chunk if chunk > 0 else max(n, 1)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] and units is None else None
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2] and units is None:
            grad_bias = torch.zeros_like(bias)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        # The matmuls in `dtype` exactly as written: an ambient autocast must not recast them.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for i in range(0, n, step):
                h = hidden[i : i + step].to(dtype)
                y = targets[i : i + step]
                logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
                part, dz = elementwise(logits, y)
                del logits
                total += part
                if grad_hidden is not None:
                    grad_hidden[i : i + step] = dz @ w
                if grad_weight is not None:
                    grad_weight += dz.t() @ h
                if grad_bias is not None:
                    grad_bias += dz.float().sum(0)
                if units is not None:
                    units(h, dz, i)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def loss_and_logit_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed cross-entropy (fp32) and its gradient w.r.t. the logits, softmax(z) -
    onehot(y), in the logits' dtype: the memory-bound part of the loss (five passes over the
    chunk's fp32 logits in eager; `torch.compile` fuses them)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
    z = z.sub_(lse[:, None]).exp_()  # softmax, in place
    z = z.scatter_add_(1, targets[:, None], torch.full_like(z[:, :1], -1.0))  # - onehot(y)
    return loss, z.to(logits.dtype)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of x with weight here: its dtype where autocast is on
    for x's device, else the weight's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    chunk: int,
    elementwise: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = (
        loss_and_logit_gradient
    ),
    units: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` against `targets`, `chunk` tokens at a time (0:
    all at once), with the gradients formed in the forward. The compute dtype is what autocast
    would give the head's matmul: its dtype where autocast is on for this device, else W's.
    `units`: see `FusedLinearCrossEntropy`."""
    dtype = compute_dtype(hidden, head.weight)
    loss: torch.Tensor = FusedLinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, chunk, dtype, elementwise, units
    )
    return loss
