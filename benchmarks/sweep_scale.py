"""How fast is the login-node side? Run by hand on a machine with a SLURM controller
(`bash slurm/cluster.sh up`): `python -m benchmarks.sweep_scale [--arms 100]`.

Measures, as whole commands a user types:
  1. `import sweep` (plan, launch, status): must not import torch; goal <= 1 s;
  2. composing, validating and submitting N arms (variants of arm A) to the controller; goal <= 10 s
     for 100, as separate jobs and as one job array;
  3. `python -m sweep.status` over them; goal <= 2 s.
Everything it submits is cancelled at the end. Prints each figure and its ratio to the goal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd[:6])}... failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return elapsed, out


def report(what: str, seconds: float, goal: float) -> None:
    print(f"{what:<58} {seconds:7.2f} s   goal {goal:5.1f} s   ratio {seconds / goal:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=100)
    args = parser.parse_args()
    probe = "import sys, time; t = time.perf_counter(); import sweep.plan, sweep.launch, sweep.status; "
    probe += "print(time.perf_counter() - t, 'torch' in sys.modules)"
    elapsed, out = timed([sys.executable, "-c", probe])
    seconds, torch_loaded = out.stdout.split()
    print(f"import sweep imports torch: {torch_loaded}")
    report("import sweep (in-process)", float(seconds), 1.0)
    report("python -c 'import sweep...' (whole process)", elapsed, 1.0)

    budgets = ",".join(str(2048 * (i + 1)) for i in range(args.arms))
    for label, extra in (("separate jobs", []), ("one job array", ["resources.array_parallelism=4"])):
        with tempfile.TemporaryDirectory() as root:
            cmd = [
                sys.executable,
                "-m",
                "sweep",
                "+experiment=sqrt_rule",
                "-m",
                "arm=A",
                f"sweep.root={root}",
                f"experiment.arms.A.token_budget={budgets}",
                "hydra/launcher=slurm",
                "resources.cpus_per_task=1",
                *extra,
            ]
            elapsed, out = timed(cmd)
            submitted = out.stdout.count("submitted ")
            report(f"compose+validate+submit {args.arms} arms ({label}, {submitted} jobs)", elapsed, 10.0)
            sweep_dir = Path(root) / "sqrt_rule"
            elapsed, out = timed([sys.executable, "-m", "sweep.status", str(sweep_dir)])
            report(f"sweep.status over {len(out.stdout.splitlines()) - 2} jobs", elapsed, 2.0)
            subprocess.run(
                [sys.executable, "-m", "sweep.cancel", str(sweep_dir)], cwd=REPO, capture_output=True
            )


if __name__ == "__main__":
    main()
