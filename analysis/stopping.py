"""Arms that stop themselves once their pairs are decided (`experiment.stop_when_decided`).

Rank 0 of every arm in a declared pair (or the yardstick) takes the sequential verdict's looks
(analysis/sequential.py) as the sweep's arms log: look k is taken once every run it needs has
logged training steps past t_k (the arms of the sweep variant's undecided pairs, and the yardstick
arms when the margin comes from them). At look k, with every run cut at t_k:

- the margin is `margin` nats, or `margin_fraction` of the yardstick's spread over [skip, t_k];
- each undecided pair gets its verdict at look k; the first look that decides a pair decides it
  for good (its decision: verdict, look, t_k, the mean gap over [skip, t_k] with its interval, δ).
  "Equivalent" counts only from `equivalent_from` of the compared range on (0.5 by default): a
  match over the first eighth of the budget says little about the rest, while a mismatch, once
  seen, stays one. Declaring fewer verdicts never raises an error rate.

The decisions depend only on the rows up to t_k, which no later step changes (a requeued arm logs
the same rows again: resume is exact), so every arm, whenever it looks, and the analysis afterwards
reach the same ones. An arm may stop when every pair it belongs to is decided and, if it is a
yardstick arm whose spread sets the margin, every pair of its variant is. Arms outside every pair
and the yardstick never look: they run their budget. A run that failed or diverged never reaches
later looks, so the arms that need it run their budget too (nothing is decided without data).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis.arms import Arm, arms_of
from analysis.collect import long_table, run_dir_arms
from analysis.options import BinSpec, Margin
from analysis.paired import in_range, matched_windows
from analysis.pairs import pair_name, replicate_pairs, yardstick_spreads
from analysis.robust import robust_mean
from analysis.sequential import Looks, look_verdict, verdict_at
from analysis.verdict import Verdict, combine
from records.manifest import read_manifest

DECISIVE = (Verdict.EQUIVALENT, Verdict.NOT_EQUIVALENT)


@dataclass(frozen=True)
class Decision:
    """How a pair was decided: its verdict at the first look that decided it."""

    verdict: str
    look: int
    tokens: int  # t_k: the compared range was [skip, tokens]
    mean_gap: float  # over [skip, tokens], pooled over replicates
    ci_low: float  # its (1 - 2 alpha) interval
    ci_high: float
    delta: float
    # The fixed-budget test (levels alpha and alpha / 2S) on the same segments and range: it
    # agrees by construction (each of its intervals is narrower), which the tests check.
    fixed: str


@dataclass
class Looking:
    """One sweep variant's looks so far: how many were taken and the pairs they decided."""

    spent: int = 0
    decided: dict[str, Decision] = field(default_factory=dict)
    judged: list[tuple[str, str]] = field(default_factory=list)  # the declared pairs both of whose arms run


@dataclass(frozen=True)
class Declared:
    """What a sweep declares for its decisions (from its manifest)."""

    pairs: list[tuple[str, str]]  # pairs and controls
    yardstick: list[tuple[str, str]]
    looks: Looks
    margin: Margin
    equivalent_from: float = 0.0  # share of the compared range before which "equivalent" is not declared

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Declared:
        d = manifest["decide"]
        budget = int(d["budget"])
        pairs = [(str(a), str(b)) for a, b in [*manifest.get("pairs", []), *manifest.get("controls", [])]]
        return cls(
            list(dict.fromkeys(pairs)),
            [(str(a), str(b)) for a, b in manifest.get("yardstick", [])],
            Looks(int(d["looks"]), int(manifest.get("skip_tokens", 0)), budget, int(d["segments"])),
            Margin(float(d["margin"]), float(d["margin_fraction"]), float(d["alpha"])),
            float(d.get("equivalent_from", 0.0)),
        )

    def needs_yardstick(self) -> bool:
        return not self.margin.nats

    def stoppable(self, base: str, found: Looking) -> bool:
        """Whether arm `base` may stop: its pairs are decided, and so is every pair of its variant
        if its spread sets the margin. An arm in no pair and outside the yardstick never stops."""
        if not found.judged:
            return False
        mine = [p for p in found.judged if base in p]
        in_yardstick = self.needs_yardstick() and any(base in p for p in self.yardstick)
        if not mine and not in_yardstick:
            return False
        wanted = found.judged if in_yardstick else mine
        return all(pair_name(p) in found.decided for p in wanted)


def take_looks(
    arms: dict[str, Arm], declared: Declared, variant: str, present: set[str], found: Looking
) -> Looking:
    """Every look after `found.spent` that the runs it needs have reached, in order; `present`:
    the arms the sweep runs in this variant (a declared pair with an arm not run is not judged)."""
    looks, margin = declared.looks, declared.margin
    decided = dict(found.decided)
    spent = found.spent
    pairs = [p for p in declared.pairs if set(p) <= present]
    for k in range(found.spent + 1, looks.looks + 1):
        undecided = [p for p in pairs if pair_name(p) not in decided]
        if not undecided:
            break
        cut = looks.tokens(k)
        needed = {a for p in undecided for a in p}
        if declared.needs_yardstick():
            needed |= {a for p in declared.yardstick for a in p} & present
        runs = [r for r in arms.values() if r.base in needed and r.variant == variant]
        if {r.base for r in runs} != needed or any(_reached(r) < cut for r in runs):
            break  # a run it needs has not logged past t_k yet (or has not started)
        spec = BinSpec(skip_tokens=looks.skip_tokens, until_tokens=cut)
        spread = yardstick_spreads(arms, [list(p) for p in declared.yardstick], spec).get(variant)
        delta = margin.delta(spread.value if spread else math.nan)
        for pair in undecided:
            decision = _decide(arms, pair, variant, delta, declared, k)
            if decision is not None:
                decided[pair_name(pair)] = decision
        spent = k
    return Looking(spent, decided, pairs)


def _reached(run: Arm) -> int:
    """The last token count up to which `run` logged every training step."""
    return int(run.steps.end[-1]) if len(run.steps.end) else 0


def _decide(
    arms: dict[str, Arm], pair: tuple[str, str], variant: str, delta: float, declared: Declared, k: int
) -> Decision | None:
    runs = replicate_pairs(arms, *pair, variant)
    if not runs or not (math.isfinite(delta) and delta > 0):
        return None
    windows = [matched_windows(x.steps, y.steps) for x, y in runs]
    looks, alpha = declared.looks, declared.margin.alpha
    verdict = look_verdict(windows, delta, alpha, looks, k)
    cut = looks.tokens(k)
    if verdict not in DECISIVE or (
        verdict == Verdict.EQUIVALENT and looks.fraction(cut) < declared.equivalent_from
    ):
        return None
    summary = combine(
        [
            robust_mean(w.gap, w.length)
            for w in (in_range(w, looks.skip_tokens, cut) for w in windows)
            if len(w)
        ]
    )
    lo, hi = summary.ci(1 - 2 * alpha)
    fixed = verdict_at(windows, delta, alpha, looks, cut)
    return Decision(str(verdict), k, cut, summary.mean, lo, hi, delta, str(fixed))


def sweep_looks(sweep_dir: str | Path, found: dict[str, Looking] | None = None) -> dict[str, Looking]:
    """Per sweep variant, the looks its arms' rows allow now (continuing from `found`); {} where
    the sweep does not stop decided arms."""
    manifest = read_manifest(sweep_dir)
    if not manifest.get("decide"):
        return {}
    declared = Declared.of(manifest)
    rows = run_dir_arms(manifest)
    if not rows:
        return dict(found or {})
    arms = arms_of(
        long_table(rows), BinSpec(skip_tokens=declared.looks.skip_tokens), {a.arm: a for a in rows}
    )
    present: dict[str, set[str]] = {}
    for name, job in manifest["jobs"].items():
        if job["kind"] == "arm":
            derived = job["derived"]
            present.setdefault(str(derived.get("variant") or ""), set()).add(str(derived.get("base") or name))
    found = found or {}
    return {
        variant: take_looks(arms, declared, variant, bases, found.get(variant, Looking()))
        for variant, bases in sorted(present.items())
    }


class ArmLooks:
    """Rank 0 of a stopping arm: when to look, what the looks found, and whether it may stop."""

    def __init__(self, sweep_dir: str, name: str, poll_s: float) -> None:
        self.sweep_dir, self.name, self.poll_s = sweep_dir, name, poll_s
        manifest = read_manifest(sweep_dir)
        self.declared = Declared.of(manifest)
        derived = manifest["jobs"][name]["derived"]
        self.base, self.variant = str(derived.get("base") or name), str(derived.get("variant") or "")
        self.found = Looking()
        self.last = -math.inf  # when the partners were last polled
        self.tried = 0  # the furthest look this arm had reached when it last looked

    def due(self, tokens: int) -> bool:
        """Whether to look now: this arm has logged the next look's tokens, and either it just got
        there or the partners it waits for were last polled `poll_s` seconds ago or more."""
        spent, looks = self.found.spent, self.declared.looks
        if spent >= looks.looks or tokens < looks.tokens(spent + 1):
            return False
        reached = max(k for k in range(spent + 1, looks.looks + 1) if tokens >= looks.tokens(k))
        return reached > self.tried or time.monotonic() - self.last >= self.poll_s

    def look(self, tokens: int) -> bool:
        """Take the looks the sweep's rows allow (this arm having logged `tokens`); whether this
        arm may stop now."""
        self.last = time.monotonic()
        looks = self.declared.looks
        self.tried = max([k for k in range(1, looks.looks + 1) if tokens >= looks.tokens(k)], default=0)
        self.found = sweep_looks(self.sweep_dir, {self.variant: self.found}).get(self.variant, self.found)
        return self.declared.stoppable(self.base, self.found)

    def record(self) -> dict[str, Any]:
        """For status.json: the looks taken and every decision of this arm's variant so far."""
        return {
            "looks": self.declared.looks.looks,
            "spent": self.found.spent,
            "pairs": {name: asdict(d) for name, d in self.found.decided.items()},
        }

    def summary(self) -> dict[str, Any]:
        """For the arm's W&B summary: each decided pair's verdict, gap and interval."""
        out: dict[str, Any] = {"looks_spent": self.found.spent}
        for name, d in self.found.decided.items():
            out |= {
                f"verdict/{name}": d.verdict,
                f"gap/{name}": d.mean_gap,
                f"ci_low/{name}": d.ci_low,
                f"ci_high/{name}": d.ci_high,
                f"decided_tokens/{name}": d.tokens,
                f"delta/{name}": d.delta,
            }
        return out
