"""How honest is a verdict? The method before (20 bins of the unpaired curves, their spread over
sqrt(bins) as SE, TOST on bins - 1 df) against the paired, autocorrelation-robust one, on simulated
pairs whose truth is known. Run by hand:

    .venv/bin/python -m benchmarks.verdict_calibration [--reps 2000] [--windows 512]
    .venv/bin/python -m benchmarks.verdict_calibration --looks   # K looks: sequential vs naive
    .venv/bin/python -m benchmarks.verdict_calibration --budget  # the budget it spends at the demo's noise

Per lag-1 autocorrelation of the step noise it prints, for each method: the share of 'NOT
equivalent' verdicts when the curves are identical (should be <= alpha = 5%), the coverage of the
nominal 90% interval of the mean gap (should be 90%), and the share of 'equivalent' verdicts when
the true gap sits exactly on the margin (should be <= 5%). The same pairs feed both methods.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from analysis.options import BinSpec
from analysis.pairs import fit_pair
from analysis.verdict import verdict
from tests.harness import simulated_pair

ALPHA = 0.05
SPEC = BinSpec(bins=20, segments=4)  # the analysis's defaults


def before(a_loss: np.ndarray, b_loss: np.ndarray, delta: float) -> tuple[str, tuple[float, float]]:
    """The previous method: 20 equal bins, unpaired bin means, SE = std(bin gaps) / sqrt(20), TOST."""
    gaps = a_loss.reshape(20, -1).mean(1) - b_loss.reshape(20, -1).mean(1)
    mean, se = gaps.mean(), gaps.std(ddof=1) / math.sqrt(20)
    q = stats.t.ppf(1 - ALPHA, 19)
    lo, hi = mean - q * se, mean + q * se
    if lo > -delta and hi < delta:
        return "equivalent", (lo, hi)
    if lo > delta or hi < -delta:
        return "not equivalent", (lo, hi)
    return "inconclusive", (lo, hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--windows", type=int, default=500)  # a multiple of 20 bins and 4 segments
    parser.add_argument("--looks", action="store_true", help="the sequential verdict's tables instead")
    parser.add_argument("--budget", action="store_true", help="only the budget the sequential verdict spends")
    args = parser.parse_args()
    if args.looks:
        looks_table(args.reps)
        return
    if args.budget:
        budget_table(args.reps // 4)
        return
    n, noise, delta = args.windows, 0.03, 0.01
    print(f"{args.reps} pairs of {n} windows, per-window noise {noise}, margin {delta} nats, alpha {ALPHA}")
    head = f"{'rho':>4}  {'method':<7} {'NOT equiv. at gap 0':>20} {'90% CI coverage':>16}"
    print(head + f" {'equiv. at gap=delta':>20}")
    for rho in (0.0, 0.3, 0.5, 0.7, 0.9):
        rng = np.random.default_rng(int(rho * 100))
        counts = {m: [0, 0, 0] for m in ("before", "now")}
        for _ in range(args.reps):
            for gap, column in ((0.0, 0), (delta, 2)):
                a, b = simulated_pair(rng, np.full(n, gap), rho, noise, windows=n)
                old_verdict, (lo, hi) = before(a.steps.loss, b.steps.loss, 1e-12 if gap == 0 else delta)
                fit = fit_pair([(a, b)], SPEC)
                new_verdict = verdict(fit.segments, 1e-12 if gap == 0 else delta, ALPHA)
                wanted = "not equivalent" if gap == 0 else "equivalent"
                counts["before"][column] += old_verdict == wanted
                counts["now"][column] += new_verdict == wanted
                if gap == 0:
                    counts["before"][1] += lo < 0 < hi
                    nlo, nhi = fit.summary.ci(1 - 2 * ALPHA)
                    counts["now"][1] += nlo < 0 < nhi
        for method, (ne, cov, eq) in counts.items():
            r = args.reps
            print(f"{rho:>4}  {method:<7} {ne / r:>20.3f} {cov / r:>16.3f} {eq / r:>20.3f}")


def looks_table(reps: int) -> None:
    """The sequential verdict (analysis/sequential.py) against the naive rule (the fixed test at
    every look): false verdicts at K looks, and the budget a pair spends at the demo's noise."""
    from tests.harness import sequential_trial

    noise, delta = 0.03, 0.01
    print(f"\nK looks: {reps} pairs per cell, per-window noise {noise}, margin {delta}, alpha {ALPHA}")
    print(
        f"{'rho':>4} {'K':>3}  {'NOT eq. at 0: seq':>18} {'naive':>6}  {'eq. at delta: seq':>18} {'naive':>6}"
    )
    for rho in (0.0, 0.5, 0.9):
        for looks in (1, 4, 8, 16):
            rng = np.random.default_rng(1000 + int(rho * 10) * 100 + looks)
            ne, eq = [0, 0], [0, 0]
            for _ in range(reps):
                seq, naive = sequential_trial(rng, 0.0, 1e-12, rho, noise, looks)
                ne[0] += seq[0] == "not equivalent"
                ne[1] += naive[0] == "not equivalent"
                seq, naive = sequential_trial(rng, delta, delta, rho, noise, looks, segments=1)
                eq[0] += seq[0] == "equivalent"
                eq[1] += naive[0] == "equivalent"
            print(
                f"{rho:>4} {looks:>3}  {ne[0] / reps:>18.3f} {ne[1] / reps:>6.3f}  "
                f"{eq[0] / reps:>18.3f} {eq[1] / reps:>6.3f}"
            )
    budget_table(reps // 4)


def budget_table(reps: int) -> None:
    """The budget a pair spends under the sequential verdict at the demo's noise."""
    from tests.harness import sequential_trial

    # The demo's J-B (the noisier of its matching pairs): 1536 windows after the transient, paired
    # noise 0.028 per window with lag-1 autocorrelation 0.06, delta 0.0263. Budget spent = the
    # deciding look / K (1 if undecided); "equivalent" from half the compared range on
    # (experiment.decide.equivalent_from's default).
    demo_noise, demo_rho, demo_delta, windows = 0.028, 0.06, 0.0263, 1536
    print(f"\nbudget spent (share of the compared range) at the demo's noise, {reps} pairs per cell")
    print(f"{'gap':>8} {'K':>3}  {'spent':>6}  {'equivalent':>10} {'NOT eq.':>8} {'inconcl.':>8}")
    for gap in (0.0, 0.5, 1.0, 2.0, 10.0):
        for looks in (4, 8, 16):
            rng = np.random.default_rng(7 + looks)
            got = [
                sequential_trial(
                    rng,
                    gap * demo_delta,
                    demo_delta,
                    demo_rho,
                    demo_noise,
                    looks,
                    windows,
                    equivalent_from=0.5,
                )[0]
                for _ in range(reps)
            ]
            spent = np.mean([k / looks if v != "inconclusive" else 1.0 for v, k in got])
            share = {
                v: np.mean([g == v for g, _ in got]) for v in ("equivalent", "not equivalent", "inconclusive")
            }
            print(
                f"{gap:>6.1f}δ {looks:>3}  {spent:>6.2f}  {share['equivalent']:>10.2f} "
                f"{share['not equivalent']:>8.2f} {share['inconclusive']:>8.2f}"
            )


if __name__ == "__main__":
    main()
