"""How long does a checkpoint of the Qwen2.5-0.5B state take to write and to load? Run by hand:

    python -m benchmarks.checkpoint_speed                 # 0.5B: ~6 GB (weights + Adam moments, fp32)
    python -m benchmarks.checkpoint_speed --model tiny --rounds 5

The state is what the trainer writes at 0.5B (the model's fp32 weights and AdamW's two moments,
random values: nothing compresses), saved by the real `train.checkpoint.save_checkpoint` into a
temporary dir under --dir (default: the system's temp dir), then loaded as rank 0 does (the
checksum verified, then read) and as every other rank of a DDP run does (read, trusting rank 0's
check). Loads are timed with the file in the page cache (a resume on the node that wrote it) and,
where this process may drop the page cache (root), cold (a requeue on another node).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tests.harness import REPO
from train import checkpoint
from train.config import ModelConfig
from train.model import build_model


def model_config(name: str) -> ModelConfig:
    import yaml

    return ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))


def training_state(cfg: ModelConfig) -> dict[str, Any]:
    """The model's weights and AdamW's moments, laid out as an optimizer state_dict."""
    model = build_model(cfg, 0)
    params = list(model.parameters())
    moments = {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(params)
    }
    groups = [{"params": list(range(len(params))), "lr": 1e-3}]
    return {"model": model.state_dict(), "optimizer": {"state": moments, "param_groups": groups}, "step": 1}


def drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2_5_0_5b", help="a conf/model/ name")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (a disk like the cluster's)")
    args = ap.parse_args()
    state = training_state(model_config(args.model))
    gb = sum(t.numel() * t.element_size() for t in _tensors(state)) / 1e9
    trusting = getattr(checkpoint, "load_trusted", None)  # absent before rank 0 verified alone
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        for step in range(1, args.rounds + 1):
            times.setdefault("write", []).append(
                timed(lambda: checkpoint.save_checkpoint(run_dir, step, state, keep=1))  # noqa: B023
            )
            path = checkpoint.checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
            for cache in ("warm", "cold"):
                if cache == "cold" and not drop_page_cache():
                    continue
                times.setdefault(f"load, rank 0 ({cache})", []).append(
                    timed(lambda: checkpoint.load_latest_checkpoint(run_dir))  # noqa: B023
                )
                if cache == "cold":
                    drop_page_cache()
                load = trusting or (lambda _: checkpoint.load_latest_checkpoint(run_dir))  # noqa: B023
                times.setdefault(f"load, other ranks ({cache})", []).append(timed(lambda: load(path)))  # noqa: B023
    print(f"checkpoint of {args.model}: {gb:.2f} GB, {args.rounds} rounds (median seconds)")
    for what, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {what:28s} {median:7.2f} s   ({gb / median:.2f} GB/s)")


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list):
        return [t for v in state for t in _tensors(v)]
    return []


if __name__ == "__main__":
    main()
