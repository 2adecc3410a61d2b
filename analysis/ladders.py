"""Variants ranked by their best lr: an lr ladder is a variant's arms at several lrs (an
experiment's `lr_ladders`, e.g. MicroAdam at ×½, ×1, ×2 of Adam's lr). A variant whose update is
smaller by construction (a larger second moment, a sign) is then judged at the lr that suits it,
not at another optimizer's.

Per sweep variant, each ladder's best arm is its lowest final validation loss (the mean over
replicates); the ladders are ranked by it, and each best arm is paired with the leading ladder's
best arm on the same validation sequences (`pair_rows`: the paired gap, its interval, a verdict).

The best arms are chosen on the same validation sequences that then measure their gap, so every
gap to the leader is biased toward the leader (the winner's curse of a best-of-k choice): a gap
whose interval excludes 0 by a wide margin is a ranking, a narrow one is not.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.arms import Arm
from analysis.options import BinSpec, Margin
from analysis.pairs import Spread, pair_name, pair_rows

COLUMNS = [
    "variant",
    "ladder",
    "best_arm",
    "final_val_loss",
    "rungs",
    "vs",
    "gap",
    "ci_low",
    "ci_high",
    "verdict",
]


def _final(arm: Arm) -> float:
    return float(arm.val_loss[np.argmax(arm.val_tokens)]) if len(arm.val_loss) else math.nan


def best_of_ladders(
    arms: dict[str, Arm],
    ladders: dict[str, list[str]],
    spec: BinSpec,
    margin: Margin,
    spreads: dict[str, Spread],
) -> pd.DataFrame:
    """One row per sweep variant and ladder, best first (see the module docstring); ladders with no
    arm evaluated yet are left out, a ladder's arms not run are not counted in `rungs`."""
    rows = []
    for variant in sorted({a.variant for a in arms.values()}):
        best: list[tuple[float, str, str, int]] = []  # (final loss, ladder, arm, rungs)
        for ladder, names in ladders.items():
            finals = {}
            for name in names:
                runs = [_final(a) for a in arms.values() if a.base == name and a.variant == variant]
                runs = [f for f in runs if math.isfinite(f)]
                if runs:
                    finals[name] = float(np.mean(runs))
            if finals:
                arm = min(finals, key=finals.__getitem__)
                best.append((finals[arm], ladder, arm, len(finals)))
        if not best:
            continue
        best.sort()
        leader = best[0][2]
        others = [[leader, arm] for _, _, arm, _ in best[1:]]
        pairs, _, _ = (
            pair_rows(arms, others, spec, margin, spreads) if others else (pd.DataFrame(), None, None)
        )
        by_name = {}
        if len(pairs):
            val = pairs[pairs["metric"] == "val"]
            by_name = {r["pair"]: r for r in val.to_dict("records")}
        for final, ladder, arm, rungs in best:
            row = {
                "variant": variant,
                "ladder": ladder,
                "best_arm": arm,
                "final_val_loss": final,
                "rungs": rungs,
            }
            paired = by_name.get(pair_name([leader, arm], variant))
            if (
                paired is not None
            ):  # the pair's gap is leader - arm: this arm minus the leader is its negative
                row |= {
                    "vs": leader,
                    "gap": -paired["mean_gap"],
                    "ci_low": -paired["ci_high"],
                    "ci_high": -paired["ci_low"],
                    "verdict": paired["verdict"],
                }
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
