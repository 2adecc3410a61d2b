"""What `experiment.stop_when_decided` saves on the seed study, by simulation. Run by hand:

    .venv/bin/python -m benchmarks.stopping_savings [--reps 400] [--looks 8] [--equivalent-from 0.5]

The GPU-hours of each arm come from the seed study's dry run (`study=seed`, run here). The pairs'
gaps, in margins, are the demo's pattern (`make demo`: A-H and J-B about 0.15 δ apart, the
control A-D 6.4 δ), each with the demo's per-window noise relative to δ and autocorrelation over
its 1536 compared windows: that the seed resolves its pairs as finely as the demo does is the
assumption. Per simulated study, each pair is decided at some look of the
sequential verdict ("equivalent" from half the range on unless --equivalent-from says otherwise);
D stops at A-D's look, and A, H, J and B, whose spread sets the margin, at the last pair's look;
the six other arms are in no declared pair and run their budget. An arm stops at its look's token
count (the lag of a real arm, which runs on until it next polls, is not counted: the demo's
measured figures are in docs/verdict.md).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.harness import REPO, sequential_trial

# Per pair as `make demo` measures it (training loss, the 1536 windows after the transient): |gap|
# in margins, the gap's noise per window (its successive-difference estimate) and lag-1
# autocorrelation. delta = 0.0263 nats.
PATTERN = {"A-H": (0.15, 0.0114, 0.02), "J-B": (0.16, 0.0273, 0.06), "A-D": (6.4, 0.042, 0.45)}
DELTA, WINDOWS = 0.0263, 1536
WAITS_FOR_ALL = ("A", "H", "J", "B")  # the yardstick arms: needed until every pair is decided


def seed_hours() -> tuple[dict[str, float], float]:
    """Per arm GPU-hours of the seed study's dry run, and the whole sweep's (warmup included)."""
    with tempfile.TemporaryDirectory() as root:
        cmd = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "study=seed", "-m"]
        out = subprocess.run(
            [*cmd, "sweep.dry_run=true", f"sweep.root={root}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = json.loads((Path(root) / "sqrt_rule" / "plan.json").read_text())
    total = re.search(r"compute: ([\d.]+) GPU-hours", out)
    arms = {r["arm"]: float(r["gpu_hours"]) for r in rows}
    return arms, float(total.group(1)) if total else sum(arms.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--looks", type=int, default=8)
    parser.add_argument(
        "--equivalent-from", type=float, default=0.5, help="experiment.decide.equivalent_from"
    )
    args = parser.parse_args()
    arms, total = seed_hours()
    rng = np.random.default_rng(0)
    spent_hours, shares, verdicts = [], {a: [] for a in arms}, {p: [] for p in PATTERN}
    for _ in range(args.reps):
        looks = {}
        for pair, (gap, noise, rho) in PATTERN.items():
            verdict, look = sequential_trial(
                rng, gap * DELTA, DELTA, rho, noise, args.looks, WINDOWS, equivalent_from=args.equivalent_from
            )[0]
            verdicts[pair].append(verdict)
            looks[pair] = look / args.looks if verdict != "inconclusive" else 1.0
        share = dict.fromkeys(arms, 1.0)
        share["D"] = looks["A-D"]
        for arm in WAITS_FOR_ALL:
            share[arm] = max(looks.values())
        for arm, s in share.items():
            shares[arm].append(s)
        spent_hours.append(total - sum(h * (1 - share[a]) for a, h in arms.items()))
    expected = float(np.mean(spent_hours))
    print(
        f"seed study ({args.reps} simulated studies, {args.looks} looks): "
        f"{total:.1f} GPU-hours without stopping"
    )
    for pair, got in verdicts.items():
        counts = {v: got.count(v) / len(got) for v in sorted(set(got))}
        print(f"  {pair} ({PATTERN[pair][0]}δ): " + ", ".join(f"{v} {c:.0%}" for v, c in counts.items()))
    print("  budget each arm runs: " + ", ".join(f"{a} {np.mean(s):.0%}" for a, s in shares.items()))
    pair_arms = ("A", "H", "J", "B", "D")
    in_pairs = sum(arms[a] for a in pair_arms)
    saved_pairs = sum(arms[a] * (1 - np.mean(shares[a])) for a in pair_arms)
    print(
        f"expected with stopping: {expected:.1f} GPU-hours, {1 - expected / total:.0%} fewer; "
        f"the five arms in declared pairs: {saved_pairs:.1f} of {in_pairs:.1f} GPU-hours saved "
        f"({saved_pairs / in_pairs:.0%}); the six others and the warmup ({total - in_pairs:.1f}) "
        "run as before"
    )


if __name__ == "__main__":
    main()
