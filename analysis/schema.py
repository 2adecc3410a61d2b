"""`python -m analysis`'s typed options: dataclasses registered in Hydra's ConfigStore as the
`analysis`, `wandb` and `sweep` nodes of conf/analysis.yaml, so a value of the wrong type or a key
that does not exist is refused at compose time (before anything is read), and `problems()` names
every value out of its range. The defaults are here, once: the display bins, segments and margin
take theirs from `BinSpec` and `Margin`, the plain values the computation itself takes.

The `experiment` node stays untyped: `+experiment=NAME` brings the preset (arms, rules, ops...),
of which the analysis reads only `name`, `pairs`, `controls`, `yardstick` and `cbs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from analysis.options import BinSpec, Margin


@dataclass
class AnalysisOptions:
    bins: int = BinSpec.bins  # display bins per pair (bin_tokens 0): tables and plots, never the verdict
    bin_tokens: int = BinSpec.bin_tokens  # fixed display bin width in tokens
    skip_tokens: int | None = None  # leave out the first tokens (the transient); None: the experiment's
    until_tokens: int = BinSpec.until_tokens  # leave out tokens past this; 0: where both arms got
    segments: int = BinSpec.segments  # the verdict's token ranges: equivalent only if every one matches
    pairs: list[list[str]] = field(default_factory=list)  # extra pairs, e.g. '[[A,B]]'
    # the pairs whose spread sets the margin; []: the experiment's (experiment.yardstick)
    yardstick: list[list[str]] = field(default_factory=list)
    margin: float = Margin.nats  # equivalence margin in nats; 0: margin_fraction x the yardstick's spread
    margin_fraction: float = Margin.fraction
    alpha: float = Margin.alpha  # equivalent when every segment's (1 - 2 alpha) CI lies inside +-margin
    out: str | None = None  # default: <sweep dir>/results

    def spec(self) -> BinSpec:
        """The compared range and bins (skip_tokens None counts as 0 here: the caller decides)."""
        return BinSpec(self.bins, self.bin_tokens, self.skip_tokens or 0, self.until_tokens, self.segments)

    def margin_of(self) -> Margin:
        return Margin(self.margin, self.margin_fraction, self.alpha)

    def problems(self) -> list[str]:
        """Every value out of its range, each naming its key (checked before anything is read)."""
        checks = [
            ("bins", self.bins, self.bins >= 1, "at least 1"),
            ("bin_tokens", self.bin_tokens, self.bin_tokens >= 0, "0 (use bins) or more tokens"),
            ("skip_tokens", self.skip_tokens, (self.skip_tokens or 0) >= 0, "0 or more tokens"),
            ("until_tokens", self.until_tokens, self.until_tokens >= 0, "0 (to the end) or more tokens"),
            ("segments", self.segments, self.segments >= 1, "at least 1"),
            ("margin", self.margin, self.margin >= 0, "0 (a fraction of the yardstick) or more nats"),
            ("margin_fraction", self.margin_fraction, self.margin_fraction > 0, "a positive fraction"),
            ("alpha", self.alpha, 0 < self.alpha < 0.5, "a level in (0, 0.5): 0.05 gives 90% intervals"),
        ]
        problems = [f"analysis.{key}={value}: expected {what}" for key, value, ok, what in checks if not ok]
        if self.until_tokens and self.until_tokens <= (self.skip_tokens or 0):
            problems.append(f"analysis.until_tokens={self.until_tokens} is not past analysis.skip_tokens")
        problems += [
            f"analysis.{key}: {list(pair)} does not name two arms"
            for key in ("pairs", "yardstick")
            for pair in getattr(self, key)
            if len(pair) != 2
        ]
        return problems


@dataclass
class WandbSource:
    """Where the W&B source reads runs from (source=wandb), and where `publish` logs the analysis."""

    entity: str = ""
    project: str = "batch-size-scaling"
    group: str | None = None  # default: the experiment name
    # extra run filters, e.g. '++wandb.filters={config.experiment: sqrt_rule}'
    filters: dict[str, Any] = field(default_factory=dict)
    base_url: str = ""  # empty: WANDB_BASE_URL or https://api.wandb.ai
    workers: int = 8  # runs fetched at once
    backoff_s: float = 2.0  # first wait after HTTP 429, doubling per attempt
    attempts: int = 6
    publish: bool = False  # also log the tables and plots as an `analysis` run in the group
    mode: str = "online"  # W&B mode of that run (offline: written under <out>/wandb for `wandb sync`)


@dataclass
class SweepLocation:
    root: str = "sweeps"
    dir: str | None = None  # default: <root>/<experiment name or W&B group>


@dataclass
class AnalysisRoot:
    """The nodes of conf/analysis.yaml whose keys a command line is checked against before Hydra
    composes (records/config_check.py); `experiment` and what a preset brings stay unchecked."""

    source: str = "run_dirs"  # run_dirs | wandb
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    wandb: WandbSource = field(default_factory=WandbSource)
    sweep: SweepLocation = field(default_factory=SweepLocation)
    experiment: dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Register the typed nodes conf/analysis.yaml's defaults list names; safe to call twice."""
    cs = ConfigStore.instance()
    cs.store(name="analysis_options", node=AnalysisOptions, package="analysis")
    cs.store(name="wandb_source", node=WandbSource, package="wandb")
    cs.store(name="sweep_location", node=SweepLocation, package="sweep")
