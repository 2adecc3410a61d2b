"""What an analysis compares and how: the display bins, the compared range and the verdict's
segments (`BinSpec`), and the margin (`Margin`). `python -m analysis`'s typed config is
analysis/schema.py; these are the plain values the computation takes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BinSpec:
    bins: int = 20  # display bins over the compared token range (when bin_tokens is 0)
    bin_tokens: int = 0  # fixed display bin width in tokens; 0 = range / bins
    skip_tokens: int = 0  # leave out samples before this many tokens (e.g. the branch transient)
    until_tokens: int = 0  # leave out samples past this many tokens; 0 = up to the common end
    segments: int = 4  # the verdict's token ranges: every one must match


@dataclass
class Margin:
    nats: float = 0.0  # equivalence margin delta in nats; 0 = `fraction` x the operating-point spread
    fraction: float = 0.25
    alpha: float = 0.05  # equivalent when every segment's (1 - 2 alpha) interval lies inside +-delta

    def delta(self, spread: float) -> float:
        """The margin in nats: `nats`, or `fraction` of the yardstick's `spread` (NaN: none)."""
        return self.nats or self.fraction * spread
