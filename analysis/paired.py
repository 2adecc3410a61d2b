"""Two arms compared on the samples they both consumed, window by window.

Every arm reads the same sample stream in the same order, so once both arms have consumed t tokens
they have seen exactly the same sequences. A *matched window* is a stretch of samples between two
token counts at which both arms ended a step: the large-batch arm's step, and the r steps of the
small-batch arm that read the same samples (any batch ratio, non-integer ones and Seesaw ramps
included: the windows are the step boundaries the two arms share). Each arm's loss over a window is
the token-weighted mean of its step losses there, a mean over exactly the window's samples, so the
window's paired gap a - b is free of which sequences happened to be in the batch: the largest part
of a step loss's noise, and common to both arms.

A window is usable only where both arms logged every step inside it (trainer.log_every_steps = 1,
the default); windows with a step missing are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from analysis.robust import MIN_N, Estimate, long_run_variance, robust_mean


@dataclass(frozen=True)
class LoggedSteps:
    """One arm's logged training steps in token order: where each step's samples start and end
    (in tokens; NaN start where the previous step was not logged) and its loss over them."""

    start: np.ndarray
    end: np.ndarray
    loss: np.ndarray

    @classmethod
    def of(cls, step: np.ndarray, tokens: np.ndarray, loss: np.ndarray) -> LoggedSteps:
        start = np.full(len(tokens), np.nan)
        if len(tokens):
            start[0] = 0.0 if step[0] == 1 else np.nan
            consecutive = step[1:] == step[:-1] + 1
            start[1:] = np.where(consecutive, tokens[:-1], np.nan)
        return cls(start, tokens.astype(np.int64), loss.astype(np.float64))

    @cached_property
    def _sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Running sums (from 0) of loss x length and of the length covered by logged steps."""
        length = np.where(np.isfinite(self.start), self.end - np.nan_to_num(self.start), 0.0)
        return np.concatenate([[0.0], np.cumsum(self.loss * length)]), np.concatenate(
            [[0.0], np.cumsum(length)]
        )

    def _at(self, bound: int) -> int:
        """Position in the running sums of a bound that is 0 or one of this arm's step ends."""
        return 0 if bound == 0 else int(np.searchsorted(self.end, bound)) + 1

    def is_bound(self, t: int) -> bool:
        i = int(np.searchsorted(self.end, t))
        return t == 0 or (i < len(self.end) and int(self.end[i]) == t)


@dataclass(frozen=True)
class Windows:
    """Matched windows of a pair, in token order: samples (start, end] in tokens, each arm's mean loss."""

    start: np.ndarray
    end: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        return self.a - self.b

    @property
    def length(self) -> np.ndarray:
        return (self.end - self.start).astype(np.float64)

    def __len__(self) -> int:
        return len(self.end)

    def select(self, keep: np.ndarray) -> Windows:
        return Windows(self.start[keep], self.end[keep], self.a[keep], self.b[keep])


def _window_means(s: LoggedSteps, bounds: np.ndarray) -> np.ndarray:
    """Token-weighted mean loss of `s` over each window (bounds[j], bounds[j+1]]; NaN where a step of
    the window was not logged. Every bound is 0 or one of the arm's step ends."""
    known = np.isfinite(s.start)
    length = np.where(known, s.end - np.nan_to_num(s.start), 0.0)
    after = np.searchsorted(s.end, bounds) + 1  # steps up to and including each bound's step
    after[bounds == 0] = 0
    first = after[:-1]  # window j holds steps first[j] .. after[j + 1] - 1, never none
    # Sums per window (reduceat), not differences of running sums: exact to the last bits.
    weighted = np.add.reduceat((s.loss * length)[: after[-1]], first)
    covered = np.add.reduceat(length[: after[-1]], first)
    span = np.diff(bounds).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(covered == span, weighted / span, np.nan)  # complete: every step logged


def _shared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The values of sorted `x` that are in sorted `y`: binary searches, no sort of 10^5 values."""
    at = np.minimum(np.searchsorted(y, x), max(len(y) - 1, 0))
    return x[y[at] == x] if len(y) else x[:0]


def matched_windows(a: LoggedSteps, b: LoggedSteps) -> Windows:
    """The windows both arms ended steps around, with both arms' mean losses (complete windows only)."""
    bounds = np.concatenate([[0], _shared(a.end, b.end)])
    if len(bounds) < 2:
        empty = np.empty(0)
        return Windows(empty.astype(np.int64), empty.astype(np.int64), empty, empty)
    mean_a, mean_b = _window_means(a, bounds), _window_means(b, bounds)
    keep = np.isfinite(mean_a) & np.isfinite(mean_b)
    return Windows(bounds[:-1][keep], bounds[1:][keep], mean_a[keep], mean_b[keep])


def mean_gap(a: LoggedSteps, b: LoggedSteps, skip_tokens: int, until_tokens: int) -> float:
    """The token-weighted mean gap a - b over the matched windows in range, from running sums (a
    few binary searches: the yardstick compares every arm with many others). NaN when no window."""
    if not (len(a.end) and len(b.end)):
        return math.nan
    cap = min(int(a.end[-1]), int(b.end[-1]), until_tokens or math.inf)
    first = int(np.searchsorted(a.end, skip_tokens))
    last = int(np.searchsorted(a.end, cap, side="right")) - 1
    lo = skip_tokens if a.is_bound(skip_tokens) and b.is_bound(skip_tokens) else None
    for _ in range(64):  # the first shared boundary at or after the skip (near it unless ratios are odd)
        if lo is not None or first > last:
            break
        lo = int(a.end[first]) if b.is_bound(int(a.end[first])) else None
        first += 1
    hi = None
    for _ in range(64):  # the last shared boundary at or before the cap
        if hi is not None or last < 0:
            break
        hi = int(a.end[last]) if b.is_bound(int(a.end[last])) else None
        last -= 1
    if lo is None or hi is None:
        w = in_range(matched_windows(a, b), skip_tokens, until_tokens)  # far-apart shared bounds
        return float(np.sum(w.gap * w.length) / np.sum(w.length)) if len(w) else math.nan
    if hi <= lo:
        return math.nan
    sums = []
    for s in (a, b):
        weighted, covered = s._sums
        i, j = s._at(lo), s._at(hi)
        if covered[j] - covered[i] != hi - lo:  # a step not logged in the range: count windows instead
            w = in_range(matched_windows(a, b), skip_tokens, until_tokens)
            return float(np.sum(w.gap * w.length) / np.sum(w.length)) if len(w) else math.nan
        sums.append(weighted[j] - weighted[i])
    return float((sums[0] - sums[1]) / (hi - lo))


def in_range(w: Windows, skip_tokens: int, until_tokens: int) -> Windows:
    """Windows that start at or after `skip_tokens` and end at or before `until_tokens` (0: no cap)."""
    keep = w.start >= skip_tokens
    if until_tokens:
        keep &= w.end <= until_tokens
    return w.select(keep)


def bin_edges(w: Windows, bins: int, bin_tokens: int) -> np.ndarray:
    """Bin edges on window boundaries (exact integers, so no step straddles a bin): `bins` equal
    shares of the windows' token range, or `bin_tokens` wide from its start. The last edge is the
    last window's end, never past it. A window belongs to the bin its end falls in
    (edge_i < end <= edge_i+1)."""
    if not len(w):
        return np.empty(0, dtype=np.int64)
    lo, hi = int(w.start[0]), int(w.end[-1])
    ideal = (
        np.arange(lo, hi, bin_tokens, dtype=np.float64) if bin_tokens > 0 else np.linspace(lo, hi, bins + 1)
    )
    bounds = np.concatenate([[lo], w.end])
    snapped = bounds[np.clip(np.searchsorted(bounds, ideal), 0, len(bounds) - 1)]
    return np.unique(np.concatenate([snapped, [lo, hi]]))


def assign(w: Windows, edges: np.ndarray) -> np.ndarray:
    """The bin of each window (by its end; edge_i < end <= edge_i+1)."""
    return np.searchsorted(edges, w.end, side="left") - 1


def segment_estimates(w: Windows, segments: int) -> tuple[np.ndarray, list[Estimate]]:
    """The compared windows cut into `segments` equal token ranges (fewer when there are too few
    windows for a standard error each), and each segment's mean gap with its robust SE."""
    k = max(1, min(segments, len(w) // MIN_N))
    edges = bin_edges(w, k, 0)
    which = assign(w, edges)
    return edges, [robust_mean(w.gap[which == i], w.length[which == i]) for i in range(len(edges) - 1)]


def residual_lrv(w: Windows, which: np.ndarray) -> tuple[float, float]:
    """The long-run variance of the gap per window after removing each segment's mean (so that a
    trend between segments does not count as noise): the per-bin standard errors of the display."""
    resid = w.gap.copy()
    for i in np.unique(which):
        resid[which == i] -= resid[which == i].mean()
    return long_run_variance(resid)


def successive_noise(x: np.ndarray) -> float:
    """Per-observation noise: the std of successive differences / sqrt(2), blind to a slow trend."""
    return float(np.std(np.diff(x), ddof=1) / math.sqrt(2)) if len(x) > 2 else math.nan
