"""How long from W&B runs to every table: 100 runs x 100k rows, cold (through the W&B client and the
protocol stand-in server of tests/) and warm (from the per-run parquet cache). Run by hand:

    .venv/bin/python -m benchmarks.analysis_speed [--runs 100] [--rows 100000] [--workers 8]

Prints each phase's seconds and the warm total against the 10 s goal. The runs come in pairs of a
batch-16 arm and a batch-4 arm (50 pairs), each with a validation row every 1000 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.report import Comparison, report
from analysis.wandb_source import WandbSelection, collect_wandb
from tests.wandb_standin import ENTITY, StandinRun, WandbStandin


def history(rows: int, batch: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    step = np.arange(1, rows + 1)
    tokens = step * batch * 128
    loss = 3 + 2 * np.exp(-tokens / 2e7) + rng.normal(0, 0.4 / np.sqrt(batch), rows)
    val = np.where(step % 1000 == 0, loss + 0.05, np.nan)
    return pd.DataFrame(
        {
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "val_loss": val,
            "lr": np.full(rows, 1e-3),
            "b_simple": rng.uniform(40, 60, rows),
            "tokens_per_s": rng.uniform(9e3, 1.1e4, rows),
            "gpu_hours": step / rows,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_API_KEY", "benchmark-" + "0" * 40)
    work = Path(tempfile.mkdtemp(prefix="analysis-bench-"))
    os.environ["WANDB_CACHE_DIR"] = str(work / "client-cache")
    pairs = [[f"L{i}", f"S{i}"] for i in range(args.runs // 2)]
    t = time.perf_counter()
    with WandbStandin() as standin:
        for i, (large, small) in enumerate(pairs):
            for name, batch in ((large, 16), (small, 4)):
                config = {"arm": {"batch_size": batch}, "run": {"signature": f"sig-{name}"}}
                frame = history(args.rows, batch, seed=2 * i + (batch == 4))
                standin.add(
                    StandinRun(
                        f"run-{name}", name, "bench", "arm", "finished", config, frame, f"2026-{i:04d}"
                    )
                )
        print(f"server: {args.runs} runs x {args.rows:,} rows ready in {time.perf_counter() - t:.1f} s")
        sel = WandbSelection(
            ENTITY, standin.project, "bench", base_url=standin.base_url, workers=args.workers
        )
        cache = work / "cache"
        results = {}
        for phase in ("cold", "warm"):
            t0 = time.perf_counter()
            found = collect_wandb(sel, cache, progress=False)
            t1 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                tables = report(found, Comparison(pairs, title="bench"), work / phase, plots=False)
            t2 = time.perf_counter()
            results[phase] = (t1 - t0, t2 - t1)
            rows = f"{len(tables['runs']):,} rows"
            print(f"{phase}: collect {t1 - t0:.2f} s, tables {t2 - t1:.2f} s, total {t2 - t0:.2f} s ({rows})")
        t3 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            report(found, Comparison(pairs, title="bench"), work / "plots")
        print(f"tables + the three plots: {time.perf_counter() - t3:.2f} s")
    warm = sum(results["warm"])
    cold = sum(results["cold"])
    print(
        f"warm total {warm:.2f} s ({warm / 10:.2f} of the 10 s goal); cold {cold:.2f} s ({cold / warm:.1f} x)"
    )


if __name__ == "__main__":
    main()
