"""B_simple from gradient norms, on synthetic gradients whose noise scale is known."""

from __future__ import annotations

import numpy as np
import pytest

from train.noise import NoiseScale


def test_estimate_recovers_the_known_noise_scale():
    # Per-sample gradients g = G + noise with |G|^2 = 4 and tr(Sigma) = 400: B_simple = 100.
    rng = np.random.default_rng(0)
    dim, b_small, b_big = 400, 8, 64
    true_grad = np.full(dim, 0.1)
    est = NoiseScale(decay=0.999)
    for _ in range(4000):
        samples = true_grad + rng.normal(size=(b_big, dim))
        small = samples[:b_small].mean(axis=0)
        big = samples.mean(axis=0)
        est.update(float(small @ small), b_small, float(big @ big), b_big)
    # The EMA over ~1000 steps of a ratio estimator: a few percent of statistical error.
    assert est.b_simple == pytest.approx(100.0, rel=0.1)


def test_state_round_trips_and_bad_sizes_are_refused():
    est = NoiseScale()
    assert est.b_simple is None
    est.update(2.0, 4, 1.0, 16)
    copy = NoiseScale()
    copy.load_state_dict(est.state_dict())
    assert copy == est and copy.b_simple == est.b_simple
    with pytest.raises(ValueError):
        est.update(1.0, 16, 1.0, 16)
