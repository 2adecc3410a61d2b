"""Scaling rules against the seed study's table (Fast-LLM batch_size_scaling, r = 16)."""

import math

import pytest

from train.rules import OperatingPoint, RuleConfig, RuleError, apply_rule

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
    }
    for name, rule in RULES.items():
        assert rule.doc and (name == "none" or "lr" in rule.doc), name
