"""How much did a change of the trainer move its step time? Run by hand:

    python -m benchmarks.step_change --against 1ccf7e0               # CPU, tiny model, micro 4
    python -m benchmarks.step_change --against 1ccf7e0 --optimizer invariant_adam

Checks the revision `--against` out into a temporary git worktree and times the real trainer's
step (`Trainer.one_step`, and `Trainer.take` where the revision has it: reading the step's
figures is part of the step's cost) in both trees, each in its own process, in rounds that
alternate the two (so drifting machine load hits both alike). Each process builds the trainer
once, lets `--settle` steps pass, then times `--steps` steps and reports their median; the ratio
new / old is taken within each round and the median round is reported with its spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs inside either tree: only what both revisions have (run_config's first eight arguments,
# stepping_trainer, one_step).
TIMER = """
import json, statistics, sys, time
from benchmarks.trainer_speed import run_config, stepping_trainer
a = json.loads(sys.argv[1])
cfg = run_config("tiny", a["seq_len"], a["batch"], a["micro_batch"], "fp32", 0, False, a["optimizer"])
times = []
with stepping_trainer(cfg, a["settle"] + a["steps"]) as trainer:
    for step in range(a["settle"] + a["steps"]):
        start = time.perf_counter()
        out = trainer.one_step(step)
        if hasattr(trainer, "take"):
            trainer.take(step, out)
        if step >= a["settle"]:
            times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""


def step_seconds(tree: Path, args: dict[str, object]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", TIMER, json.dumps(args)],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(args["threads"])},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the revision to compare with (a commit, a tag)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "invariant_adam"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settle", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    timer = {
        k: getattr(args, k)
        for k in ("seq_len", "batch", "micro_batch", "optimizer", "steps", "settle", "threads")
    }
    old = Path(tempfile.mkdtemp(prefix="step-change-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=REPO, check=True)
    rounds: list[tuple[float, float]] = []
    try:
        for _ in range(args.rounds):
            rounds.append((step_seconds(REPO, timer), step_seconds(old, timer)))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
        shutil.rmtree(old.parent, ignore_errors=True)
    ratios = sorted(new / before for new, before in rounds)
    new_ms = statistics.median(r[0] for r in rounds) * 1e3
    old_ms = statistics.median(r[1] for r in rounds) * 1e3
    print(
        f"tiny model, batch {args.batch} x seq {args.seq_len}, micro {args.micro_batch}, {args.optimizer}, "
        f"{args.threads} thread(s), {args.rounds} rounds of {args.steps} steps"
    )
    print(f"step time: this tree {new_ms:.2f} ms, {args.against} {old_ms:.2f} ms (medians of the rounds)")
    print(
        f"ratio this/{args.against} {statistics.median(ratios):.3f} (median round); per round: "
        + " ".join(f"{r:.3f}" for r in ratios)
    )


if __name__ == "__main__":
    main()
