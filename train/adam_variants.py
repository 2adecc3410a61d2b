"""Adam and signSGD variants fed per-unit gradient moments (train/per_example.py), one optimizer.

Every variant steps with the mean gradient mu_hat of the step's U units (`.grad`) and differs in
what its second moment (or its sign) is fed. Units are micro-batches for `invariant_adam` and
sequences (or tokens: `trainer.per_example_unit`) for the others.

What was read, and what is this project's own: of Roulet & Agarwala 2025 (arXiv:2510.00236,
"Per-example gradients: a new frontier for understanding and improving optimizers") only the
abstracts of v1 and v2 could be read here, and a summary naming E[g], E[g^2], E[sign g], SignEMA,
MicroAdamVar and MicroAdamMSQ; the paper's reference code is optax's microbatching
(`optax.experimental.microbatching.micro_grad`, whose documented example tests/test_per_example.py
checks). The abstracts say the sign's placement matters and is predicted by a signal-to-noise
argument, and that Adam's preconditioner does best dominated by the mean squared rather than the
variance. The update rules below are this project's reconstruction from those names, not the
paper's equations; docs/trainer.md lists the choices the paper may have made differently.

Second-moment input v_in of the Adam variants (elementwise; expectations over the batch, with mu
and sigma^2 the per-unit gradient's mean and variance):

    adamw           mu_hat^2                              E = mu^2 + sigma^2 / U  (torch's AdamW)
    invariant_adam  M = mean_u g_u^2 over micro-batches   E = mu^2 + sigma^2_b  (Wang & Aitchison 2024)
    micro_adam      M = mean_u g_u^2 over sequences       E = mu^2 + sigma^2      "MicroAdam"
    micro_adam_var  U / (U - 1) (M - mu_hat^2)            E = sigma^2             "MicroAdamVar"
    micro_adam_msq  (U mu_hat^2 - M) / (U - 1)            E = mu^2                "MicroAdamMSQ"

(MicroAdam here is Roulet & Agarwala's name, not the compressed optimizer of Modoranu et al. 2024
with the same name.) The last two are the unbiased estimators of
sigma^2 and mu^2 from the U per-unit gradients; `micro_adam_msq`'s input can be negative for one
step, so its EMA is clamped at zero where the root is taken. Both need U >= 2 sequences. With one
sequence per step (U = 1) M = mu_hat^2: MicroAdam is Adam.

Each input is formed from mu_hat and the per-unit M2 = sum_u (g_u - mu_hat)^2, which
train/per_example.py merges stably (Chan's update): M = M2 / U + mu_hat^2, MicroAdamVar's input is
M2 / (U - 1) and MicroAdamMSQ's mu_hat^2 - M2 / (U (U - 1)). The one-pass form M - mu_hat^2 would
lose every digit of the variance where |mu| >> sigma.

Then, like AdamW (decoupled weight decay, bias-corrected moments):

    m = beta1 m + (1 - beta1) mu_hat;   v = beta2 v + (1 - beta2) v_in
    p = p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(max(v, 0) / (1 - beta2^t)) + eps)

signSGD with momentum, by where the sign sits in the chain per-unit gradients -> mean -> EMA
(the abstract's "placement of the sign operation"):

    sign_example  m = EMA_beta1(mean_u sign(g_u));  p -= lr m / (1 - beta1^t)   the sign first
    sign_mean     m = EMA_beta1(sign(mu_hat));      p -= lr m / (1 - beta1^t)   signSGD, then momentum
    sign_ema      m = EMA_beta1(mu_hat);            p -= lr sign(m)             "SignEMA" (Signum)

with the same decoupled weight decay (beta2 and eps are unused). With beta1 = 0, sign_mean and
sign_ema are both signSGD.

The trainer drives the step as: `UnitGradients.begin()`, the units' gradients, `finish()` (which
sets `.grad` to mu_hat and returns the moments), `optimizer.feed(moments)`, `optimizer.step()`;
`sign_mean` and `sign_ema` need only `.grad` (a plain backward), so they take no moments.

Gradient clipping, where it fires, scales `.grad` (mu_hat) but not the per-unit moments; the
studies keep it off (trainer.grad_clip = 1e9). fp16 is refused: the per-unit gradients would carry
the loss scale (squared, for M).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from train.config import OPTIMIZERS
from train.per_example import Moments

VARIANTS = [name for name in OPTIMIZERS if name != "adamw"]  # all but torch's AdamW


def second_moment_input(
    variant: str, mean: list[torch.Tensor], m2: list[torch.Tensor], units: int
) -> list[torch.Tensor]:
    """What the second moment of `variant` is fed, parameter by parameter, from the mean gradients
    mu_hat, the per-unit M2 = sum_u (g_u - mu_hat)^2 (train/per_example.py forms it stably) and the
    number of units U (the table in the module docstring, with M = M2 / U + mu_hat^2); foreach
    ops, one kernel launch per op for all parameters."""
    if variant in ("invariant_adam", "micro_adam"):  # M
        out = list(torch._foreach_mul(mean, mean))
        torch._foreach_add_(out, m2, alpha=1 / units)
        return out
    if variant == "micro_adam_var":  # U / (U - 1) (M - mu_hat^2) = M2 / (U - 1): never negative
        return list(torch._foreach_div(m2, float(units - 1)))
    if variant == "micro_adam_msq":  # (U mu_hat^2 - M) / (U - 1) = mu_hat^2 - M2 / (U (U - 1))
        out = list(torch._foreach_mul(mean, mean))
        torch._foreach_add_(out, m2, alpha=-1 / (units * (units - 1)))
        return out
    raise ValueError(f"{variant} takes no second-moment input")


class VariantAdam(torch.optim.Optimizer):
    """One of `VARIANTS` (see the module docstring) with AdamW's hyperparameters."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        variant: str,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.variant = variant
        self.spec = OPTIMIZERS[variant]
        # This step's moments: set by `feed`, used once by `step`; never optimizer state, so they
        # stay out of checkpoints.
        self._moments: Moments | None = None

    @property
    def needs_moments(self) -> bool:
        """Whether `step` needs `feed(moments)` first: all but the two that sign the mean."""
        return bool(self.spec.unit)

    @property
    def needs_squares(self) -> bool:
        return self.spec.squares

    @property
    def needs_signs(self) -> bool:
        return self.spec.signs

    def feed(self, moments: Moments) -> None:
        if moments.units < self.spec.min_units:
            raise ValueError(
                f"{self.variant} needs at least {self.spec.min_units} sequences per step, got {moments.units}"
            )
        self._moments = moments

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One step of every parameter with a gradient, in foreach ops (a few kernel launches
        per op for the whole model, not one per parameter)."""
        if closure is not None:
            raise ValueError("VariantAdam takes no closure: the trainer feeds it per-unit moments")
        moments, self._moments = self._moments, None
        if moments is None and self.needs_moments:
            raise RuntimeError("VariantAdam.step() needs feed(moments) first (see train/adam_variants.py)")
        index = {p: i for i, p in enumerate(self._params())}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    if self.needs_squares:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            # Parameters step together where their step counts agree (all of them, unless some
            # had no gradient in an earlier step): the bias corrections are per count.
            by_count: dict[int, list[torch.Tensor]] = {}
            for p in params:
                by_count.setdefault(self.state[p]["step"], []).append(p)
            for t, same in by_count.items():
                self._step(group, same, t, moments, [index[p] for p in same])

    def _step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        t: int,
        moments: Moments | None,
        at: list[int],
    ) -> None:
        """The update of `params`, all at step count `t`; `at`: their places in the moments' lists."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        grads = [p.grad for p in params if p.grad is not None]  # all of them: the filter is for mypy
        m = [self.state[p]["exp_avg"] for p in params]
        if wd != 0:  # a multiply of every weight by 1 otherwise
            torch._foreach_mul_(params, 1 - lr * wd)
        if self.needs_squares:
            assert moments is not None and moments.m2 is not None  # kept for these
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            v_in = second_moment_input(self.variant, grads, [moments.m2[i] for i in at], moments.units)
            torch._foreach_mul_(v, beta2)
            torch._foreach_add_(v, v_in, alpha=1 - beta2)
            # only MSQ's input can be negative: the others' v needs no clamp (no extra copy)
            root = torch._foreach_clamp_min(v, 0.0) if self.variant == "micro_adam_msq" else v
            denom = torch._foreach_sqrt(root)
            torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - beta1**t))
        elif self.variant == "sign_ema":
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)
            torch._foreach_add_(params, torch._foreach_sign(m), alpha=-lr)
        else:
            if self.variant == "sign_example":
                assert moments is not None and moments.mean_sign is not None  # kept for it
                direction = [moments.mean_sign[i] for i in at]
            else:
                direction = list(torch._foreach_sign(grads))
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, direction, alpha=1 - beta1)
            torch._foreach_add_(params, m, alpha=-lr / (1 - beta1**t))
