"""Scaling rules against the seed study's table (Fast-LLM batch_size_scaling, r = 16)."""

import math

import pytest

from train.rules import (
    OperatingPoint,
    RuleConfig,
    RuleError,
    apply_rule,
    half_life,
    surge_factor,
    weight_decay_timescale,
)

SEED_A = OperatingPoint(reference_batch=512, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)


def test_sqrt_rule_gives_the_seed_arm_h():
    h = apply_rule(SEED_A, RuleConfig("sqrt"), 32)
    assert h.reference_batch == 32
    assert h.lr == pytest.approx(2.5e-5, rel=1e-12)
    assert h.beta1 == pytest.approx(0.9 ** (1 / 16), rel=1e-12)
    assert h.beta2 == pytest.approx(0.95 ** (1 / 16), rel=1e-12)
    assert h.eps == pytest.approx(4e-8, rel=1e-12)  # eps / sqrt(1/16)


def test_sqrt_rule_can_keep_eps_as_the_seed_did():
    assert apply_rule(SEED_A, RuleConfig("sqrt", keep_eps=True), 32).eps == 1e-8


def test_keep_lr_beta2_gives_the_seed_arm_b():
    b = apply_rule(SEED_A, RuleConfig("keep_lr_beta2"), 32)
    assert (b.lr, b.beta1, b.eps) == (1e-4, 0.9, 1e-8)
    assert b.beta2 == pytest.approx(0.95 ** (1 / 16), rel=1e-12)


def test_j_is_b_moved_up_by_sqrt_lr_and_beta2():
    b = apply_rule(SEED_A, RuleConfig("keep_lr_beta2"), 32)
    j = apply_rule(b, RuleConfig("sqrt_beta2"), 512)
    assert j.lr == pytest.approx(4e-4, rel=1e-12)
    assert j.beta1 == 0.9
    assert j.beta2 == pytest.approx(0.95, rel=1e-12)


def test_sqrt_rule_round_trip_is_the_identity():
    there = apply_rule(SEED_A, RuleConfig("sqrt"), 8)
    back = apply_rule(there, RuleConfig("sqrt"), 512)
    for name in ("lr", "beta1", "beta2", "eps"):
        assert getattr(back, name) == pytest.approx(getattr(SEED_A, name), rel=1e-12)


def test_beta_scaling_keeps_the_token_half_life():
    # Half-life in steps times tokens per step is the same at both batch sizes.
    h = apply_rule(SEED_A, RuleConfig("sqrt"), 32)
    half_life_tokens = lambda beta, batch: math.log(0.5) / math.log(beta) * batch  # noqa: E731
    assert half_life_tokens(h.beta2, 32) == pytest.approx(half_life_tokens(0.95, 512), rel=1e-9)


def test_none_and_linear():
    assert apply_rule(SEED_A, RuleConfig("none"), 32).lr == 1e-4
    assert apply_rule(SEED_A, RuleConfig("linear"), 32).lr == pytest.approx(1e-4 / 16)


@pytest.mark.parametrize(
    ("op", "rule", "message"),
    [
        (OperatingPoint(reference_batch=512, lr=1e-4, beta1=1.0, beta2=0.95), "none", "beta1=1.0, outside"),
        (OperatingPoint(reference_batch=512, lr=1e-4, beta1=0.9, beta2=0.0), "sqrt", "beta2=0.0, outside"),
        (SEED_A, "cubic", "unknown scaling rule 'cubic'"),
    ],
)
def test_invalid_results_are_refused(op, rule, message):
    with pytest.raises(RuleError, match=message):
        apply_rule(op, RuleConfig(rule), 32)


def test_the_rest_of_the_seed_matrix():
    g = apply_rule(SEED_A, RuleConfig("sqrt_lr"), 32)
    assert (g.lr, g.beta1, g.beta2, g.eps) == (pytest.approx(2.5e-5, rel=1e-12), 0.9, 0.95, 1e-8)
    i = apply_rule(SEED_A, RuleConfig("sqrt_beta2"), 32)
    assert (i.lr, i.beta1) == (pytest.approx(2.5e-5, rel=1e-12), 0.9)
    assert i.beta2 == pytest.approx(0.95 ** (1 / 16), rel=1e-12)
    m = apply_rule(SEED_A, RuleConfig("keep_lr_both"), 32)
    assert (m.lr, m.eps) == (1e-4, 1e-8)
    assert (m.beta1, m.beta2) == (pytest.approx(0.9 ** (1 / 16)), pytest.approx(0.95 ** (1 / 16)))
    c = apply_rule(SEED_A, RuleConfig("linear_beta"), 32)
    assert c.lr == pytest.approx(1e-4 / 16, rel=1e-12)
    assert (c.beta1, c.beta2) == (pytest.approx(0.9 ** (1 / 16)), pytest.approx(0.95 ** (1 / 16)))


def test_first_order_beta_form():
    h = apply_rule(SEED_A, RuleConfig("sqrt", beta_form="first_order"), 32)
    assert h.beta1 == pytest.approx(1 - 0.1 / 16, rel=1e-12)
    assert h.beta2 == pytest.approx(1 - 0.05 / 16, rel=1e-12)
    # Moving up 16x in first order takes beta1 = 0.9 to 1 - 1.6 < 0: refused, not clipped silently.
    with pytest.raises(RuleError, match=r"beta1=-0\.59999"):
        apply_rule(
            OperatingPoint(reference_batch=32, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8),
            RuleConfig("sqrt", beta_form="first_order"),
            512,
        )
    with pytest.raises(RuleError, match="beta_form"):
        apply_rule(SEED_A, RuleConfig("sqrt", beta_form="cubic"), 32)


def test_beta_clamps():
    small = OperatingPoint(reference_batch=32, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)
    up = apply_rule(small, RuleConfig("keep_lr_beta2"), 512)
    assert up.beta2 == pytest.approx(0.95**16)  # 0.44: far too short a memory for v
    floored = apply_rule(small, RuleConfig("keep_lr_beta2", beta2_min=0.9), 512)
    assert floored.beta2 == 0.9
    capped = apply_rule(SEED_A, RuleConfig("keep_lr_beta2", beta2_max=0.99), 32)
    assert capped.beta2 == 0.99


def test_every_rule_documents_its_formula():
    from train.rules import RULES

    assert set(RULES) == {
        "none",
        "linear",
        "sqrt",
        "sqrt_beta2",
        "sqrt_lr",
        "keep_lr_beta2",
        "keep_lr_both",
        "linear_beta",
        "surge",
    }
    for name, rule in RULES.items():
        assert rule.doc and (name == "none" or "lr" in rule.doc), name


def test_surge_by_hand():
    """Li et al. 2024: eta_opt(B) = eta_max / (1/2 (sqrt(Bn/B) + sqrt(B/Bn))). By hand, with Bn = 64:
    at B = Bn, eta_opt = eta_max; at B = Bn/4 or 4 Bn, eta_max / (1/2 (2 + 1/2)) = 0.8 eta_max."""
    assert surge_factor(64, 16, 64.0) == pytest.approx(1 / 0.8, rel=1e-12)
    assert surge_factor(256, 64, 64.0) == pytest.approx(0.8, rel=1e-12)
    assert surge_factor(256, 16, 64.0) == pytest.approx(1.0, rel=1e-12)  # symmetric about Bn
    # Far below the noise scale it is the square-root rule: 1/16 of the batch, ~1/4 of the lr.
    assert surge_factor(1, 16, 1e6) == pytest.approx(0.25, rel=1e-3)
    op = OperatingPoint(reference_batch=16, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    moved = apply_rule(op, RuleConfig("surge", b_noise=64.0), 64)
    assert moved.lr == pytest.approx(1.25e-3, rel=1e-12) and (moved.beta1, moved.beta2) == (0.9, 0.95)
    with pytest.raises(RuleError, match="b_noise > 0"):
        apply_rule(op, RuleConfig("surge"), 64)


def test_weight_decay_timescale_rule_keeps_tau_in_tokens():
    """Wang & Aitchison 2024: tau = 1/(lr wd) steps. The weight_decay preset's numbers by hand: A at
    batch 16 x 128 tokens, lr 5e-3, wd 0.5: tau = 2048 / 2.5e-3 = 819,200 tokens. The sqrt rule to
    batch 1 gives lr 1.25e-3; wd kept, tau = 128 / 6.25e-4 = 204,800 tokens (4x shorter); the
    timescale form gives wd' = 0.5 x (1/16) x 4 = 0.125 and tau 819,200 tokens again."""
    op = OperatingPoint(reference_batch=16, lr=5e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.5)
    assert weight_decay_timescale(op.lr, op.weight_decay, 16 * 128) == pytest.approx(819_200)
    kept = apply_rule(op, RuleConfig("sqrt"), 1)
    assert kept.weight_decay == 0.5
    assert weight_decay_timescale(kept.lr, kept.weight_decay, 128) == pytest.approx(204_800)
    timescale = apply_rule(op, RuleConfig("sqrt", weight_decay_form="timescale"), 1)
    assert timescale.weight_decay == pytest.approx(0.125, rel=1e-12)
    assert weight_decay_timescale(timescale.lr, timescale.weight_decay, 128) == pytest.approx(819_200)
    assert weight_decay_timescale(1e-3, 0.0, 128) == math.inf
    with pytest.raises(RuleError, match="weight_decay_form"):
        apply_rule(op, RuleConfig("sqrt", weight_decay_form="tokens"), 1)


def test_half_life_in_tokens():
    """beta^n = 1/2: beta2 0.95 halves after 13.51 steps; beta^16 (the sqrt rule's exact form at
    r = 16) keeps it at the same tokens with 16x smaller steps."""
    assert half_life(0.5, 100) == pytest.approx(100.0)
    assert half_life(0.95, 2048) == pytest.approx(math.log(0.5) / math.log(0.95) * 2048)
    assert half_life(0.95 ** (1 / 16), 128) == pytest.approx(half_life(0.95, 2048), rel=1e-9)
