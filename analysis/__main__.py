"""`python -m analysis +experiment=NAME` or `python -m analysis source=wandb wandb.entity=E wandb.project=P
wandb.group=G`: pairwise comparison tables, verdicts and plots (options: analysis/schema.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from analysis.report import Comparison, analyze, check_pairs, report
from analysis.schema import AnalysisOptions, SweepLocation, WandbSource, register
from records import config_dir

register()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _pairs(node: Any) -> list[list[str]]:
    return [list(map(str, p)) for p in (node or [])]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="analysis")
def main(cfg: DictConfig) -> None:
    a: AnalysisOptions = OmegaConf.to_object(cfg.analysis)  # type: ignore[assignment]
    w: WandbSource = OmegaConf.to_object(cfg.wandb)  # type: ignore[assignment]
    where: SweepLocation = OmegaConf.to_object(cfg.sweep)  # type: ignore[assignment]
    if cfg.source not in ("run_dirs", "wandb"):
        _fail(f"source={cfg.source}: use run_dirs (the sweep's run dirs) or wandb (the W&B API)")
    exp = cfg.experiment
    name = exp.name or w.group
    if where.dir is None and not name:
        _fail("which sweep? give +experiment=NAME, sweep.dir=PATH, or (source=wandb) wandb.group=G")
    sweep_dir = Path(where.dir or Path(where.root) / str(name))
    # From run dirs the sweep's manifest says what its experiment declares; from W&B the config does.
    declared = cfg.source == "wandb"
    controls = _pairs(exp.controls) if declared else []
    problems = a.problems()
    problems += [f"experiment.controls: {p} does not name two arms" for p in controls if len(p) != 2]
    if problems:
        _fail("; ".join(problems))
    ladder = exp.get("cbs", {}) or {}
    cmp = Comparison(
        _pairs(exp.pairs) if declared else [],
        a.spec(),
        a.margin_of(),
        controls=controls,
        yardstick=_pairs(a.yardstick) or (_pairs(exp.yardstick) if declared else []),
        extra=_pairs(a.pairs),
        ladder=list(ladder.get("ladder", [])),
        epsilon=float(ladder.get("epsilon", 0.01)),
        targets=[float(t) for t in ladder.get("targets", [])],
        # skip_tokens None: the experiment's declared transient (recorded in the sweep's manifest).
        experiment_skip=a.skip_tokens is None,
    )
    out = Path(a.out) if a.out else None
    try:
        if cfg.source == "wandb":
            from analysis.wandb_source import WandbSelection, collect_wandb

            group = w.group or exp.name
            if not (w.entity and w.project and group):
                _fail("source=wandb needs wandb.entity, wandb.project and wandb.group (or +experiment=NAME)")
            sel = WandbSelection(
                w.entity, w.project, str(group), w.filters, w.base_url, w.workers, w.backoff_s, w.attempts
            )
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
        group = str(w.group or tables.title)
        where_published = publish(tables, Path(str(tables.out)), w.project, w.entity, group, w.mode)
        print(f"published the analysis to W&B group {group}: {where_published}")


def run() -> None:
    """`python -m analysis` and the `bss-analysis` console script."""
    from analysis.schema import AnalysisRoot
    from records.config_check import override_problems, yaml_problems

    argv = sys.argv[1:]
    problems = yaml_problems(argv, config_dir()) or override_problems(argv, AnalysisRoot, config_dir())
    if problems:
        _fail("; ".join(problems))
    main()


if __name__ == "__main__":
    run()
