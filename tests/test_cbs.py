"""The critical batch size: the McCandlish fit on synthetic ladders with a known B_crit, and the
branched estimate on paired gaps whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.cbs import branch_of, branched, fit_hyperbola, mccandlish, steps_to_target

SEQ = 128
BATCHES = [4, 8, 16, 32, 64, 128]  # six batch sizes around B_crit = 32


def ladder_curves(
    b_crit: float, s_min_scale: float, noise: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Binned loss curves of a ladder whose steps to any loss obey S = S_min (1 + B_crit / B):
    loss = 2 + 3 exp(-p / s_min_scale) with progress p = steps / ((1 + B_crit / B) u), u a per-run
    speed factor with `noise` relative spread (a run that is a few % slower or faster throughout)."""
    rng = np.random.default_rng(seed)
    bins, arms = [], []
    for batch in BATCHES:
        u = 1 + noise * rng.standard_normal()
        steps = np.arange(1, 4001) * (1 + b_crit / batch) * 2  # enough to pass every target
        loss = 2 + 3 * np.exp(-steps / ((1 + b_crit / batch) * u) / s_min_scale)
        edges = np.linspace(0, len(steps), 201).astype(int)
        for i in range(200):
            j1 = edges[i + 1]
            bins.append(
                {
                    "arm": f"K{batch}",
                    "bin_end": int(steps[j1 - 1] * batch * SEQ),
                    "mean": float(loss[j1 - 1]),
                }
            )
        arms.append(
            {"arm": f"K{batch}", "base": f"K{batch}", "variant": "", "batch_size": batch, "seq_len": SEQ}
        )
    return pd.DataFrame(bins), pd.DataFrame(arms)


def test_steps_to_target_interpolates_the_first_crossing():
    ends, mean = np.array([100, 200, 300]), np.array([3.0, 2.0, 1.0])
    assert steps_to_target(ends, mean, 2.5, 10) == pytest.approx(15.0)
    assert math.isnan(steps_to_target(ends, mean, 0.5, 10))


def test_the_fit_is_exact_on_an_exact_hyperbola():
    b = np.array(BATCHES, dtype=float)
    s_min, b_crit = fit_hyperbola(b, 1000 * (1 + 32 / b))
    assert s_min == pytest.approx(1000, rel=1e-6) and b_crit == pytest.approx(32, rel=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_mccandlish_fit_recovers_b_crit_within_ten_percent(seed):
    """Synthetic curves, 3% run-to-run noise, 6 batch sizes, known B_crit = 32 at every target: the
    fit is within +-10% of it and its 90% bootstrap interval brackets the estimate."""
    bins, arms = ladder_curves(32.0, 300.0, 0.03, seed)
    fit = mccandlish(bins, arms, [f"K{b}" for b in BATCHES], [3.5, 3.0, 2.5])
    assert len(fit) == 3
    for row in fit.itertuples():
        assert row.b_crit == pytest.approx(32.0, rel=0.1), row
        assert row.b_crit_low <= row.b_crit <= row.b_crit_high
        assert row.e_min == pytest.approx(row.s_min * row.b_crit)


def test_bootstrap_interval_covers_the_truth_most_of_the_time():
    """Over 40 synthetic ladders the 90% interval holds the true B_crit in most (>= 75%: a residual
    bootstrap on 6 points under-covers a little; this guards against an interval of the wrong size)."""
    hits = 0
    for seed in range(40):
        bins, arms = ladder_curves(32.0, 300.0, 0.03, 100 + seed)
        fit = mccandlish(bins, arms, [f"K{b}" for b in BATCHES], [3.0])
        hits += bool(fit["b_crit_low"].iloc[0] <= 32.0 <= fit["b_crit_high"].iloc[0])
    assert hits >= 30, hits


def test_branched_critical_batch_from_paired_segments():
    """Ladder K1..K16 paired with K1; the last segment's gap loss(K1) - loss(Kk) with SE 0.002 on
    1000 df (90% half-width ~0.0033). Larger batches lag by 0, 0.005, 0.012, 0.05 nats at k = 2, 4,
    8, 16: with epsilon 0.01 the critical batch is 4, surely >= 4 (CI of k=4 below 0.01), and below
    16 for sure; k = 8 (0.012 +- 0.0033) may or may not be within, so the interval is [4, 8]."""
    lag = {2: 0.0, 4: 0.005, 8: 0.012, 16: 0.05}
    pairs = pd.DataFrame(
        [
            {
                "metric": "train",
                "pair": f"K1-K{k}",
                "a": "K1",
                "b": f"K{k}",
                "batch_a": 1,
                "batch_b": k,
                "alpha": 0.05,
            }
            for k in lag
        ]
    )
    gaps = pd.DataFrame(
        [
            {
                "metric": "train",
                "unit": "segment",
                "pair": f"K1-K{k}",
                "bin_end": 1000,
                "gap": -v,
                "gap_se": 0.002,
                "gap_df": 1000,
            }
            for k, v in lag.items()
        ]
    )
    arms = pd.DataFrame([{"arm": "K1", "base": "K1", "variant": "", "b_noise": 3.0}])
    out = branched(pairs, gaps, arms, ["K1", "K2", "K4", "K8", "K16"], 0.01)
    row = out.iloc[0]
    assert (row["critical_batch"], row["critical_low"], row["critical_high"]) == (4, 4, 8)
    assert row["b_noise"] == 3.0 and row["batches"] == "2 4 8 16"


def test_a_branch_point_of_experiment_branch_from_is_placed_at_the_tokens_its_checkpoint_records():
    """Branch points swept over the researcher's checkpoints: the x of cbs.csv / cbs.png is what
    each checkpoint records (the arms' branch_tokens), nan where it records nothing."""
    arms = pd.DataFrame(
        {
            "variant": ["experiment.branch_from=/ckpt/10B", "experiment.branch_from=/ckpt/50B", "x=1"],
            "branch_tokens": [1e10, 5e10, math.nan],
        }
    )
    assert branch_of("experiment.branch_from=/ckpt/50B", arms) == (
        "experiment.branch_from=/ckpt/50B",
        5e10,
    )
    label, tokens = branch_of("x=1", arms)
    assert label == "x=1" and math.isnan(tokens)
    assert branch_of("experiment.warmup.token_budget=8192", arms)[1] == 8192
