"""Batch-size scaling rules for Adam: pure functions, no torch.

An operating point is a set of Adam hyperparameters tuned at a reference batch size. A rule
moves it to another batch size. With kappa = batch / reference_batch:

| rule | lr | beta1 | beta2 | eps | source |
|---|---|---|---|---|---|
| `none` | kept | kept | kept | kept | the unscaled control (seed arm D) |
| `linear` | lr * kappa | kept | kept | kept | the SGD rule (Goyal et al. 2017), the naive baseline |
| `sqrt` | lr * sqrt(kappa) | scaled | scaled | eps / sqrt(kappa) | Malladi et al. 2022, SDE rule (seed H) |
| `sqrt_beta2` | lr * sqrt(kappa) | kept | scaled | kept | seed arm I (and J = B moved up this way) |
| `sqrt_lr` | lr * sqrt(kappa) | kept | kept | kept | seed arm G |
| `keep_lr_beta2` | kept | kept | scaled | kept | Marek et al. 2025 (seed arm B) |
| `keep_lr_both` | kept | scaled | scaled | kept | seed arm M |
| `linear_beta` | lr * kappa | scaled | scaled | kept | seed arm C |
| `surge` | lr * s(B) / s(B_ref) | kept | kept | kept | Li et al. 2024 (Adam's surge), below |

`surge` (Li et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling",
arXiv 2405.14578, the sign-of-gradient case): Adam's optimal lr rises with the batch, peaks at
the noise scale and falls beyond it,

    eta_opt(B) = eta_max / (1/2 (sqrt(B_noise / B) + sqrt(B / B_noise)))

so the rule moves lr by s(B) / s(B_ref) with s(B) = 1 / (sqrt(B_noise / B) + sqrt(B / B_noise)).
Well below B_noise it is the square-root rule (s ~ sqrt(B / B_noise)); at B_noise it is flat.
`b_noise` (sequences) is a rule setting: the value a study measured at its branch point (the
warmup's logged B_simple, `python -m analysis` arms.csv) or one from elsewhere.

Weight decay, for every rule (`weight_decay_form`): AdamW's decoupled decay shrinks the weights by
(1 - lr wd) per step, a timescale of tau = 1 / (lr wd) steps (Wang & Aitchison 2024, "How to set
AdamW's weight decay as you scale model and dataset size", arXiv 2405.13698). `kept` keeps wd, so
tau in tokens changes with lr and the batch; `timescale` keeps tau in *tokens*,
B' / (lr' wd') = B / (lr wd), i.e. wd' = wd kappa lr / lr'.

"Scaled" moves 1 - beta with kappa, in one of two forms (`RuleConfig.beta_form`):
- `exact` (default): beta -> beta**kappa, which keeps the moment's half-life in *tokens*: after
  kappa times fewer steps of kappa times larger batches, old gradients weigh the same;
- `first_order`: 1 - beta -> kappa * (1 - beta), the SDE papers' form (equal to first order in
  1 - beta; it can leave (0, 1) for large kappa, which is refused).
Optional clamps bound the scaled betas (`beta2_min` / `beta2_max`, `beta1_min` / `beta1_max`;
0 = none), as large-batch beta2 scaling is known to need a floor. `sqrt` with `keep_eps=True`
keeps eps (the seed study kept 1e-8 on every arm).

The sweep calls these to print and validate the arm table before anything is queued; the
trainer only receives their results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from train.config import AdamHyperparameters


@dataclass
class OperatingPoint(AdamHyperparameters):
    """Adam hyperparameters tuned at `reference_batch` sequences."""

    reference_batch: int = 64


@dataclass
class RuleConfig:
    name: str = "none"
    keep_eps: bool = False  # for `sqrt`: keep eps instead of eps / sqrt(kappa)
    beta_form: str = "exact"  # exact (beta**kappa) | first_order (1 - kappa * (1 - beta))
    beta1_min: float = 0.0  # clamps on scaled betas; 0 = no clamp
    beta1_max: float = 0.0
    beta2_min: float = 0.0
    beta2_max: float = 0.0
    b_noise: float = 0.0  # `surge`: the gradient noise scale, in sequences (> 0)
    weight_decay_form: str = "kept"  # kept | timescale (wd' = wd kappa lr / lr': tau fixed in tokens)


class RuleError(ValueError):
    """A rule produced hyperparameters Adam cannot use (beta outside (0, 1), lr <= 0...)."""


@dataclass(frozen=True)
class Rule:
    """A rule as exponents of kappa: lr * kappa**lr_power, eps * kappa**eps_power, and which betas
    are scaled; `doc` gives the formula and where it comes from (shown by `python -m sweep`)."""

    lr_power: float
    beta1: bool
    beta2: bool
    eps_power: float
    doc: str


RULES: dict[str, Rule] = {
    "none": Rule(0.0, False, False, 0.0, "nothing scaled: the control (seed arm D)"),
    "linear": Rule(1.0, False, False, 0.0, "lr*k, betas and eps kept: the SGD rule (Goyal et al. 2017)"),
    "sqrt": Rule(
        0.5,
        True,
        True,
        -0.5,
        "lr*sqrt(k), both betas scaled, eps/sqrt(k): Malladi et al. 2022 SDE rule (seed H)",
    ),
    "sqrt_beta2": Rule(
        0.5, False, True, 0.0, "lr*sqrt(k), beta2 scaled (seed arm I; J is B moved up this way)"
    ),
    "sqrt_lr": Rule(0.5, False, False, 0.0, "lr*sqrt(k) only (seed arm G)"),
    "keep_lr_beta2": Rule(0.0, False, True, 0.0, "lr kept, beta2 scaled: Marek et al. 2025 (seed arm B)"),
    "keep_lr_both": Rule(0.0, True, True, 0.0, "lr kept, both betas scaled (seed arm M)"),
    "linear_beta": Rule(1.0, True, True, 0.0, "lr*k, both betas scaled (seed arm C)"),
    "surge": Rule(
        0.0,
        False,
        False,
        0.0,
        "lr*s(B)/s(B_ref), s(B) = 1/(sqrt(B_noise/B) + sqrt(B/B_noise)): Li et al. 2024",
    ),
}
BETA_FORMS = ("exact", "first_order")
WEIGHT_DECAY_FORMS = ("kept", "timescale")


def surge_factor(batch: float, reference: float, b_noise: float) -> float:
    """lr(batch) / lr(reference) under Li et al.'s Adam surge: s(batch) / s(reference),
    s(B) = 1 / (sqrt(B_noise / B) + sqrt(B / B_noise))."""
    if b_noise <= 0:
        raise RuleError(f"rule 'surge' needs b_noise > 0 (sequences), got {b_noise!r}")

    def s(b: float) -> float:
        return 1.0 / (math.sqrt(b_noise / b) + math.sqrt(b / b_noise))

    return s(batch) / s(reference)


def weight_decay_timescale(lr: float, weight_decay: float, batch_tokens: int) -> float:
    """AdamW's decay timescale in tokens, tau = batch_tokens / (lr wd) (Wang & Aitchison 2024);
    inf without weight decay."""
    return batch_tokens / (lr * weight_decay) if lr * weight_decay > 0 else math.inf


def half_life(beta: float, batch_tokens: int) -> float:
    """Tokens after which an EMA with factor `beta` per step weighs a gradient half:
    ln(1/2) / ln(beta) steps of `batch_tokens`."""
    return math.log(0.5) / math.log(beta) * batch_tokens


def scale_beta(beta: float, kappa: float, form: str = "exact") -> float:
    """beta moved to kappa times the batch: `beta**kappa` (exact) or `1 - kappa (1 - beta)`."""
    if form == "exact":
        return beta**kappa
    if form == "first_order":
        return 1.0 - kappa * (1.0 - beta)
    raise RuleError(f"unknown beta_form {form!r}; known: {', '.join(BETA_FORMS)}")


def _clamp(value: float, low: float, high: float) -> float:
    if low > 0:
        value = max(value, low)
    if high > 0:
        value = min(value, high)
    return value


def apply_rule(op: OperatingPoint, rule: RuleConfig, batch_size: int) -> OperatingPoint:
    """Move `op` to `batch_size` under `rule`; the result's reference_batch is `batch_size`.

    Raises RuleError for an unknown rule or a result Adam cannot use.
    """
    if rule.name not in RULES:
        raise RuleError(f"unknown scaling rule {rule.name!r}; known: {', '.join(sorted(RULES))}")
    if op.reference_batch <= 0 or batch_size <= 0:
        raise RuleError(f"batch sizes must be positive (reference {op.reference_batch}, batch {batch_size})")
    spec = RULES[rule.name]
    kappa = batch_size / op.reference_batch
    moved = replace(op, reference_batch=batch_size, lr=op.lr * kappa**spec.lr_power)
    if rule.name == "surge":
        moved.lr = op.lr * surge_factor(batch_size, op.reference_batch, rule.b_noise)
    if rule.weight_decay_form == "timescale":
        moved.weight_decay = op.weight_decay * kappa * op.lr / moved.lr
    elif rule.weight_decay_form != "kept":
        raise RuleError(
            f"unknown weight_decay_form {rule.weight_decay_form!r}; known: {', '.join(WEIGHT_DECAY_FORMS)}"
        )
    if spec.eps_power and not rule.keep_eps:
        moved.eps = op.eps * kappa**spec.eps_power
    if spec.beta1:
        moved.beta1 = _clamp(scale_beta(op.beta1, kappa, rule.beta_form), rule.beta1_min, rule.beta1_max)
    if spec.beta2:
        moved.beta2 = _clamp(scale_beta(op.beta2, kappa, rule.beta_form), rule.beta2_min, rule.beta2_max)
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
