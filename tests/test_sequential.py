"""The sequential verdict (analysis/sequential.py) checked against known answers: its boundaries
against the published O'Brien-Fleming-type values and a simulated Brownian motion, and its false
verdicts by simulation when a pair is looked at 4 and 16 times (2000 pairs per cell, as in the
table of docs/verdict.md, which `python -m benchmarks.verdict_calibration --looks` prints)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.paired import Windows, segment_estimates
from analysis.sequential import Looks, levels_at, look_verdict, nominal_levels
from analysis.verdict import verdict
from tests.harness import ar1, sequential_trial

ALPHA = 0.05
REPS = 2000
NOISE, DELTA = 0.03, 0.01  # per-window paired noise and margin (nats), as in test_calibration.py


def test_the_boundaries_are_the_lan_demets_obrien_fleming_ones():
    """Four equally spaced looks at one-sided 0.025: z = 4.333, 2.963, 2.359, 2.014 (the standard
    Lan-DeMets O'Brien-Fleming-type bounds); one look is the fixed level itself, exactly."""
    z = stats.norm.isf(nominal_levels(4, 0.025))
    assert z == pytest.approx([4.333, 2.963, 2.359, 2.014], abs=2e-3)
    assert nominal_levels(1, 0.05) == (0.05,)


@pytest.mark.parametrize("fractions", [(0.25, 0.5, 0.75, 1.0), (0.1, 0.35, 0.8, 1.0)])
def test_a_brownian_motion_crosses_the_boundaries_as_often_as_the_level_spends(fractions):
    """200k simulated canonical paths (independent increments, information = fraction): the share
    crossing at some look is 0.025 within 3 simulation SEs, and by each look what was spent."""
    rng = np.random.default_rng(0)
    t = np.array(fractions)
    paths = np.cumsum(rng.standard_normal((200_000, len(t))) * np.sqrt(np.diff(t, prepend=0.0)), axis=1)
    z = paths / np.sqrt(t)
    crossed = np.maximum.accumulate(z >= stats.norm.isf(levels_at(fractions, 0.025)), axis=1).mean(0)
    spent = [2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - 0.0125) / math.sqrt(f)) for f in fractions]
    se = math.sqrt(0.025 * 0.975 / 200_000)
    assert crossed == pytest.approx(spent, abs=3 * se)


def test_one_look_is_the_fixed_budget_verdict_on_the_budgets_segments():
    rng = np.random.default_rng(1)
    ends = (np.arange(512) + 1) * 2048
    for gap in (0.0, 0.004, 0.02):
        w = Windows(ends - 2048, ends, gap + ar1(rng, 512, 0.5, NOISE), np.zeros(512))
        fixed = verdict(segment_estimates(w, 4)[1], DELTA, ALPHA)
        assert look_verdict([w], DELTA, ALPHA, Looks(1, 0, int(ends[-1])), 1) == fixed


@pytest.mark.parametrize(("looks", "rho"), [(4, 0.0), (8, 0.9), (16, 0.5)])  # every cell: the benchmark
def test_looking_repeatedly_keeps_both_false_verdict_rates_at_alpha(looks, rho):
    """NOT equivalent when the curves are identical (a vanishing margin: the worst case) and
    equivalent when the true gap sits on the margin (one segment: the IU test's worst case), each
    at most alpha + 2 simulation SEs over `looks` looks; the naive rule (the fixed test at every
    look) is far above it, which is what the spending buys."""
    rng = np.random.default_rng(looks * 10 + int(rho * 10))
    not_equivalent = naive = equivalent = 0
    for _ in range(REPS):
        seq, fixed = sequential_trial(rng, 0.0, 1e-12, rho, NOISE, looks)
        not_equivalent += seq[0] == "not equivalent"
        naive += fixed[0] == "not equivalent"
        seq, _ = sequential_trial(rng, DELTA, DELTA, rho, NOISE, looks, segments=1)
        equivalent += seq[0] == "equivalent"
    bound = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)
    assert not_equivalent / REPS <= bound, f"NOT equivalent {not_equivalent / REPS:.3f}"
    assert equivalent / REPS <= bound, f"equivalent {equivalent / REPS:.3f}"
    assert naive / REPS > 2 * ALPHA


def test_a_pair_far_off_is_decided_early_and_a_close_one_about_as_often_as_at_the_budget():
    """10 delta off: NOT equivalent in every draw, on average by the second of 16 looks. A true gap
    0 (a segment's SE is about a third of delta): called equivalent with 16 looks at most 10 points
    less often than by the fixed-budget test (what the spending costs in power; 200 draws each,
    SE 3 points), and on average well before the last look."""
    rng = np.random.default_rng(7)
    far = [sequential_trial(rng, 10 * DELTA, DELTA, 0.17, NOISE, 16)[0] for _ in range(100)]
    assert all(v == "not equivalent" for v, _ in far) and np.mean([k for _, k in far]) <= 2
    close = [sequential_trial(rng, 0.0, DELTA, 0.17, NOISE, 16)[0] for _ in range(200)]
    fixed = [sequential_trial(rng, 0.0, DELTA, 0.17, NOISE, 1)[0] for _ in range(200)]
    share = np.mean([v == "equivalent" for v, _ in close])
    assert share >= np.mean([v == "equivalent" for v, _ in fixed]) - 0.10
    assert np.mean([k for v, k in close if v == "equivalent"]) <= 8
