"""The verdict looked at repeatedly: group-sequential levels that spend alpha over the looks.

A pair looked at after every validation with the fixed-budget test would be called "NOT
equivalent" (or "equivalent") by chance far more often than alpha: every look is another chance.
Here a sweep declares K looks in advance (`experiment.decide.looks`) at equally spaced token counts of the
compared range, t_k = skip + k/K (budget - skip), and at look k every test of the fixed-budget
verdict (analysis/verdict.py) runs at a *nominal* level p_k in place of its level: the levels
of a one-sided group-sequential boundary whose crossing probabilities spend the test's level a over
the looks by the Lan-DeMets approximation of O'Brien-Fleming,

    spent(t) = 2 - 2 Phi(Phi^-1(1 - a/2) / sqrt(t))          (spent(1) = a)

(as gsDesign's `sfLDOF` documents it, after Lan & DeMets 1983). Under the canonical joint
distribution of the statistic over looks (a Brownian motion in the information fraction t, here
the share of the compared tokens seen), the boundary c_k solves

    P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = spent(t_k) - spent(t_{k-1}),

computed by the recursive numerical integration of group-sequential designs (the density of the
score on a grid, one look at a time), and p_k = 1 - Phi(c_k). With K = 1, p_1 = a: the rule is the
fixed-budget verdict. The Student-t intervals then use p_k as their level (each segment's own
degrees of freedom), so:

- **equivalent at look k**: every segment seen by t_k has its (1 - 2 p(alpha)) interval inside
  +-delta (the two one-sided tests, each spending alpha over the looks);
- **NOT equivalent at look k**: some segment's interval at one-sided level p_k(alpha / 2S) lies
  outside +-delta (S segments, both sides: Bonferroni as in the fixed verdict, each side of each
  segment spending alpha / 2S over the looks).

Why this design: O'Brien-Fleming-type spending keeps almost all of alpha for the late looks (at
K = 4 the last look's nominal level is 0.042 of 0.05), so a pair that is undecided until the end
loses little against the fixed-budget test, while a control that is off by many margins is still
decided at the first look or two; the levels are fixed before any data (no sample-size
re-estimation); and the spending is over *pre-declared token counts*, which every arm of a pair
reaches whatever its speed, so two arms (and the analysis afterwards) compute the same decision from
the same rows. Confidence sequences were the alternative: valid at every step, but wider at any
fixed budget and resting on i.i.d. (sub-Gaussian) increments that an autocorrelated gap does not
have. The segments are the budget's, fixed before any data (`Looks`), so each segment's estimate
grows as a cumulative mean over the looks that see it and its tests spend over those looks; the
estimates are still not exactly the canonical Brownian statistic (the SE is estimated):
tests/test_sequential.py checks the error rates by simulation, and docs/verdict.md gives the table.

An early "equivalent" is a claim about [skip, t_k]: the curves matched within +-delta over every
segment of what was run. A pair stopped there says nothing about the budget past t_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from scipy import optimize, stats

from analysis.paired import Windows
from analysis.robust import Estimate, robust_mean
from analysis.verdict import Verdict, combine, verdict

GRID = 1601  # grid points for the score's density at each look (accuracy ~1e-7 in the levels)
TAIL = 9.0  # the grid reaches this many standard deviations below the mean: the rest is < 1e-18
Z_MAX = 12.0  # a look that spends (numerically) nothing: its boundary, crossed with probability 2e-33


def spent(t: float, level: float) -> float:
    """The Lan-DeMets O'Brien-Fleming-type spending function: level spent by information fraction t."""
    if t <= 0:
        return 0.0
    return float(2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - level / 2) / math.sqrt(min(t, 1.0))))


def nominal_levels(looks: int, level: float) -> tuple[float, ...]:
    """One-sided nominal levels p_1..p_K of a boundary spending `level` over `looks` equally spaced
    looks (see the module doc); exactly (level,) for one look: the fixed-budget verdict."""
    return levels_at(tuple(k / looks for k in range(1, looks + 1)), level)


@lru_cache(maxsize=1024)
def levels_at(fractions: tuple[float, ...], level: float) -> tuple[float, ...]:
    """One-sided nominal levels of a boundary spending `level` over looks at the increasing
    information `fractions` (the last one 1); exactly (level,) for the single look (1,)."""
    if fractions == (1.0,):
        return (level,)
    levels: list[float] = []
    # The score S_k ~ N(0, t_k) under the null, with independent increments; `density` holds its
    # (defective) density on `grid` over the paths that have not crossed yet.
    grid = density = np.empty(0)
    previous_t, previous_spent = 0.0, 0.0
    for t in fractions:
        target = spent(t, level) - previous_spent
        if not len(grid):  # the first look: S_1 ~ N(0, t_1) exactly
            c = min(float(stats.norm.isf(target)), Z_MAX) if target > 0 else Z_MAX
            bound = c * math.sqrt(t)
            grid = np.linspace(-TAIL * math.sqrt(t), bound, GRID)
            density = stats.norm.pdf(grid, scale=math.sqrt(t))
        else:
            sd = math.sqrt(t - previous_t)
            weights = _simpson(grid) * density
            top = grid[-1] + TAIL * sd
            bound = _boundary(grid, weights, sd, target, top)
            c = bound / math.sqrt(t)
            new_grid = np.linspace(-TAIL * math.sqrt(t), bound, GRID)
            kernel = stats.norm.pdf((new_grid[:, None] - grid[None, :]) / sd) / sd
            grid, density = new_grid, kernel @ weights
        levels.append(float(stats.norm.sf(c)))
        previous_t, previous_spent = t, spent(t, level)
    return tuple(levels)


def _boundary(grid: np.ndarray, weights: np.ndarray, sd: float, target: float, top: float) -> float:
    """The score's boundary at a look such that the paths still in (`weights` on `grid`) cross it
    with probability `target` after an increment of sd `sd`; `top` where that is out of reach."""

    def crossing(b: float) -> float:
        return float(weights @ stats.norm.sf((b - grid) / sd))

    if target <= crossing(top):
        return top
    return float(optimize.brentq(lambda b: crossing(b) - target, grid[0] - TAIL * sd, top, xtol=1e-12))


def _simpson(x: np.ndarray) -> np.ndarray:
    """Simpson's-rule weights on an equally spaced grid of odd length."""
    h = x[1] - x[0]
    w = np.ones(len(x))
    w[1:-1:2], w[2:-1:2] = 4, 2
    return w * h / 3


@dataclass(frozen=True)
class Looks:
    """K pre-declared looks at a pair's compared range [skip_tokens, budget], cut once into
    `segments` equal token ranges of the budget (not of what was run: a segment is the same
    stretch of samples at every look, so its estimate grows as a cumulative mean, which is what
    the boundaries assume)."""

    looks: int  # K; 1 = the fixed-budget verdict at the budget
    skip_tokens: int
    budget: int
    segments: int = 4

    def tokens(self, k: int) -> int:
        """Look k's token count t_k (k = 1..K): the compared range ends there."""
        return self.skip_tokens + math.ceil(k * (self.budget - self.skip_tokens) / self.looks)

    def fraction(self, tokens: int) -> float:
        """The share of the compared range that `tokens` reaches (the budget spent, past the skip)."""
        return min(1.0, max(0.0, (tokens - self.skip_tokens) / (self.budget - self.skip_tokens)))

    @cached_property
    def edges(self) -> np.ndarray:
        """The segments' token edges: a window belongs to the segment its end falls in."""
        span = self.budget - self.skip_tokens
        return np.array(
            [self.skip_tokens + math.ceil(j * span / self.segments) for j in range(self.segments + 1)]
        )

    def seen(self, j: int, k: int) -> float:
        """The share of segment j (0-based) that look k has seen."""
        lo, hi = self.edges[j], self.edges[j + 1]
        return min(1.0, max(0.0, (self.tokens(k) - lo) / (hi - lo)))

    def levels(self, k: int, alpha: float) -> tuple[tuple[float, float] | None, ...]:
        """Per segment at look k: the one-sided nominal levels (equivalence, NOT-equivalence) of
        its tests, or None for a segment not reached yet. A segment's tests spend over the looks
        that see it (its own information fraction: the share of it seen); a complete segment keeps
        the levels of the look that completed it, the same test on the same samples."""
        return _segment_levels(self, k, alpha)


@lru_cache(maxsize=4096)
def _segment_levels(self: Looks, k: int, alpha: float) -> tuple[tuple[float, float] | None, ...]:
    out: list[tuple[float, float] | None] = []
    for j in range(self.segments):
        fractions: list[float] = []
        for look in range(1, self.looks + 1):
            f = self.seen(j, look)
            if f > 0 and (not fractions or fractions[-1] < 1.0):
                fractions.append(round(f, 12))
        mine = self.seen(j, k)
        if mine == 0:
            out.append(None)
            continue
        at = min(fractions.index(round(mine, 12)), len(fractions) - 1)
        grid = tuple(fractions)
        # Each side of each segment's NOT-equivalence test gets alpha / 2S (Bonferroni over
        # the segments of the budget, as in the fixed verdict); equivalence alpha (IU test).
        out.append((levels_at(grid, alpha)[at], levels_at(grid, alpha / (2 * self.segments))[at]))
    return tuple(out)


def estimates_at(windows: list[Windows], looks: Looks, cut: int) -> list[Estimate | None]:
    """Per segment of the budget: the mean paired gap over its windows that end by `cut` (pooled
    over the replicates' windows), or None for a segment not reached yet, or reached by too few
    windows to estimate its SE (a segment just begun carries no information yet)."""
    edges = looks.edges
    out: list[Estimate | None] = []
    for j in range(looks.segments):
        if cut <= edges[j]:
            out.append(None)
            continue
        parts = []
        for w in windows:
            keep = (w.end > edges[j]) & (w.end <= min(edges[j + 1], cut)) & (w.start >= looks.skip_tokens)
            parts.append(robust_mean(w.gap[keep], w.length[keep]))
        estimate = combine(parts)
        partial = cut < edges[j + 1]
        out.append(None if partial and not math.isfinite(estimate.se) else estimate)
    return out


def look_verdict(windows: list[Windows], delta: float, alpha: float, looks: Looks, k: int) -> Verdict:
    """The sequential verdict at look k from the pair's matched windows (one list per replicate)."""
    return verdict_at(windows, delta, alpha, looks, looks.tokens(k), looks.levels(k, alpha))


def verdict_at(
    windows: list[Windows],
    delta: float,
    alpha: float,
    looks: Looks,
    cut: int,
    levels: tuple[tuple[float, float] | None, ...] | None = None,
) -> Verdict:
    """The verdict on the budget's segments up to `cut`, at `levels` (per segment; None: the
    fixed-budget ones, alpha and alpha / 2S for the S segments of the budget)."""
    fixed = (alpha, alpha / (2 * looks.segments))
    seen = [
        (e, lv)
        for e, lv in zip(estimates_at(windows, looks, cut), levels or (fixed,) * looks.segments, strict=True)
        if e is not None and lv is not None
    ]
    return verdict([e for e, _ in seen], delta, alpha, [lv for _, lv in seen])
