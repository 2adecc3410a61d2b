"""Batch-size scaling rules for Adam: pure functions, no torch.

An operating point is a set of Adam hyperparameters tuned at a reference batch size. A rule
moves it to another batch size. With kappa = batch / reference_batch:

- `none`: nothing changes.
- `sqrt` (Malladi et al. 2022, the SDE rule for Adam): lr * sqrt(kappa), each beta -> beta**kappa
  (1 - beta scaled by kappa, in the exact form that keeps the moment's half-life in tokens),
  eps / sqrt(kappa). `keep_eps=True` keeps eps (the seed study kept 1e-8 on every arm).
- `sqrt_beta2`: lr * sqrt(kappa) and beta2 -> beta2**kappa; beta1 and eps kept (seed arm J from B).
- `keep_lr_beta2` (Marek et al. 2025): lr kept, beta2 -> beta2**kappa so its token half-life is
  kept; beta1 and eps kept.
- `linear`: lr * kappa, betas and eps kept (the SGD rule, here as the naive baseline).

The sweep calls these to print and validate the arm table before anything is queued; the
trainer only receives their results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass
class OperatingPoint:
    """Adam hyperparameters tuned at `reference_batch` sequences."""

    reference_batch: int = 64
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class RuleConfig:
    name: str = "none"
    keep_eps: bool = False  # for `sqrt`: keep eps instead of eps / sqrt(kappa)


class RuleError(ValueError):
    """A rule produced hyperparameters Adam cannot use (beta outside (0, 1), lr <= 0...)."""


def _beta(beta: float, kappa: float) -> float:
    # beta**kappa keeps the number of *tokens* over which the moment averages: after kappa times
    # fewer steps of kappa times larger batches the old gradients weigh the same.
    return beta**kappa


def _none(op: OperatingPoint, kappa: float, rule: RuleConfig) -> OperatingPoint:
    return replace(op)


def _sqrt(op: OperatingPoint, kappa: float, rule: RuleConfig) -> OperatingPoint:
    eps = op.eps if rule.keep_eps else op.eps / math.sqrt(kappa)
    return replace(
        op, lr=op.lr * math.sqrt(kappa), beta1=_beta(op.beta1, kappa), beta2=_beta(op.beta2, kappa), eps=eps
    )


def _sqrt_beta2(op: OperatingPoint, kappa: float, rule: RuleConfig) -> OperatingPoint:
    return replace(op, lr=op.lr * math.sqrt(kappa), beta2=_beta(op.beta2, kappa))


def _keep_lr_beta2(op: OperatingPoint, kappa: float, rule: RuleConfig) -> OperatingPoint:
    return replace(op, beta2=_beta(op.beta2, kappa))


def _linear(op: OperatingPoint, kappa: float, rule: RuleConfig) -> OperatingPoint:
    return replace(op, lr=op.lr * kappa)


RULES: dict[str, Callable[[OperatingPoint, float, RuleConfig], OperatingPoint]] = {
    "none": _none,
    "sqrt": _sqrt,
    "sqrt_beta2": _sqrt_beta2,
    "keep_lr_beta2": _keep_lr_beta2,
    "linear": _linear,
}


def apply_rule(op: OperatingPoint, rule: RuleConfig, batch_size: int) -> OperatingPoint:
    """Move `op` to `batch_size` under `rule`; the result's reference_batch is `batch_size`.

    Raises RuleError for an unknown rule or a result Adam cannot use.
    """
    if rule.name not in RULES:
        raise RuleError(f"unknown scaling rule {rule.name!r}; known: {', '.join(sorted(RULES))}")
    if op.reference_batch <= 0 or batch_size <= 0:
        raise RuleError(f"batch sizes must be positive (reference {op.reference_batch}, batch {batch_size})")
    kappa = batch_size / op.reference_batch
    moved = RULES[rule.name](op, kappa, rule)
    moved.reference_batch = batch_size
    for beta_name in ("beta1", "beta2"):
        beta = getattr(moved, beta_name)
        if not 0.0 < beta < 1.0:
            raise RuleError(
                f"rule {rule.name!r} at kappa={kappa:g} gives {beta_name}={beta!r}, outside (0, 1)"
            )
    if not (moved.lr > 0 and math.isfinite(moved.lr)):
        raise RuleError(f"rule {rule.name!r} at kappa={kappa:g} gives lr={moved.lr!r}")
    if not moved.eps > 0:
        raise RuleError(f"rule {rule.name!r} at kappa={kappa:g} gives eps={moved.eps!r}")
    return moved
