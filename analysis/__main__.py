"""`python -m analysis +experiment=NAME` or `python -m analysis source=wandb wandb.entity=E wandb.project=P
wandb.group=G`: pairwise comparison tables, verdicts and plots (see conf/analysis.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from analysis.report import Comparison, analyze, check_pairs, report
from analysis.tables import BinSpec, Margin, option_problems
from sweep import config_dir


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analysis")
def main(cfg: DictConfig) -> None:
    a, w = cfg.analysis, cfg.wandb
    if cfg.source not in ("run_dirs", "wandb"):
        _fail(f"source={cfg.source}: use run_dirs (the sweep's run dirs) or wandb (the W&B API)")
    name = cfg.experiment.name or w.group
    if cfg.sweep.dir is None and not name:
        _fail("which sweep? give +experiment=NAME, sweep.dir=PATH, or (source=wandb) wandb.group=G")
    sweep_dir = Path(cfg.sweep.dir or Path(cfg.sweep.root) / str(name))
    exp = cfg.experiment
    # From run dirs the sweep's manifest says what its experiment declares; from W&B the config does.
    declared = cfg.source == "wandb"
    pairs: list[list[str]] = [list(p) for p in exp.pairs or []] if declared else []
    extra = [list(p) for p in a.pairs]
    controls = [list(p) for p in exp.controls or []] if declared else []
    yardstick = [list(p) for p in a.yardstick or (exp.yardstick if declared else []) or []]
    bad = [p for p in [*pairs, *extra, *controls, *yardstick] if len(p) != 2]
    if bad:
        _fail(f"a pair names two arms, got {bad}")
    # skip_tokens null: the experiment's declared transient (recorded in the sweep's manifest), else 0.
    skip = 0 if a.skip_tokens is None else a.skip_tokens
    spec = BinSpec(a.bins, a.bin_tokens, skip, a.until_tokens, a.segments)
    margin = Margin(a.margin, a.margin_fraction, a.alpha)
    problems = option_problems(spec, margin)
    if problems:
        _fail("; ".join(problems))
    ladder = cfg.experiment.get("cbs", {}) or {}
    cmp = Comparison(
        pairs,
        spec,
        margin,
        controls=controls,
        yardstick=yardstick,
        extra=extra,
        ladder=list(ladder.get("ladder", [])),
        epsilon=float(ladder.get("epsilon", 0.01)),
        targets=[float(t) for t in ladder.get("targets", [])],
        experiment_skip=a.skip_tokens is None,
    )
    out = Path(a.out) if a.out else None
    try:
        if cfg.source == "wandb":
            from analysis.wandb_source import WandbSelection, collect_wandb

            group = w.group or cfg.experiment.name
            if not (w.entity and w.project and group):
                _fail("source=wandb needs wandb.entity, wandb.project and wandb.group (or +experiment=NAME)")
            filters: dict[str, Any] = OmegaConf.to_container(w.filters)  # type: ignore[assignment]
            sel = WandbSelection(
                w.entity, w.project, group, filters, w.base_url, w.workers, w.backoff_s, w.attempts
            )  # type: ignore[arg-type]
            found = collect_wandb(sel, sweep_dir / "wandb_cache" / w.entity / w.project)
            check_pairs([*cmp.compared, *cmp.yardstick], found, set())
            cmp.title = str(group)
            tables = report(found, cmp, out or sweep_dir / "results")
        else:
            tables = analyze(sweep_dir, cmp, out)
    except (FileNotFoundError, LookupError, ValueError) as exc:
        _fail(str(exc))
    if w.publish:
        from analysis.publish import publish

        # The sweep's runs log into the group named after the experiment (the manifest's title).
        group = str(w.group or tables["title"])
        where = publish(tables, Path(tables["out"]), w.project, w.entity, group, w.mode)
        print(f"published the analysis to W&B group {group}: {where}")


def run() -> None:
    """`python -m analysis` and the `bss-analysis` console script."""
    main()


if __name__ == "__main__":
    run()
