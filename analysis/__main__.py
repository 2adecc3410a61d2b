"""`python -m analysis +experiment=NAME` (or `sweep.dir=PATH`): pairwise divergence tables and plots."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from analysis.report import analyze
from analysis.tables import BinSpec


@hydra.main(version_base="1.3", config_path="../conf", config_name="analysis")
def main(cfg: DictConfig) -> None:
    sweep_dir = Path(cfg.sweep.dir)
    if not (sweep_dir / "manifest.json").exists():
        sys.exit(f"error: {sweep_dir} holds no manifest.json: run the sweep first, or set sweep.dir=PATH")
    a = cfg.analysis
    spec = BinSpec(bins=a.bins, bin_tokens=a.bin_tokens, skip_tokens=a.skip_tokens)
    analyze(sweep_dir, spec, [list(p) for p in a.pairs])


if __name__ == "__main__":
    main()
