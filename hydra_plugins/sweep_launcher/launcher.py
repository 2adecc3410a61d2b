"""The Hydra Launcher of `python -m sweep ... -m`: a thin shell around `sweep.launch`.

Hydra instantiates launchers only from the `hydra_plugins` namespace, so the class lives here;
all logic is in `sweep/`. Unlike hydra-submitit-launcher, the SLURM executor returns as soon as
the jobs are submitted, and every arm is validated before the first one is queued.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


def compose_jobs(
    hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]]
) -> list[DictConfig]:
    """Every job's config. The first is composed by Hydra; a job that differs from it only by
    plain value overrides (no config group, no `+`/`~`) is that config with the values set,
    which is what composition would give, at a fraction of its cost on large sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = hydra_context.config_loader
    first = loader.load_sweep_config(config, list(job_overrides[0]))
    groups = set(OmegaConf.select(first, "hydra.runtime.choices", default={}) or {})
    parser = OverridesParser.create()
    out = [first]
    for overrides in job_overrides[1:]:
        changed = [o for o in overrides if o not in job_overrides[0]]
        parsed = parser.parse_overrides(changed)
        simple = all(
            not (p.is_add() or p.is_delete() or p.is_force_add() or p.is_hydra_override())
            and p.package is None
            and p.key_or_group not in groups
            and OmegaConf.select(first, p.key_or_group, default=None) is not None
            for p in parsed
        )
        if not simple or len(parsed) != len(changed):
            out.append(loader.load_sweep_config(config, list(overrides)))
            continue
        cfg = copy.deepcopy(first)
        with open_dict(cfg):
            for p in parsed:
                OmegaConf.update(cfg, p.key_or_group, p.value(), merge=False)
            cfg.hydra.overrides.task = list(overrides)
        out.append(cfg)
    return out


class SweepLauncher(Launcher):
    def __init__(
        self, executor: str = "local", max_parallel: int = 1, poll_s: float = 0.5, analyze: bool = True
    ):
        self.options: dict[str, Any] = dict(
            executor=executor, max_parallel=max_parallel, poll_s=poll_s, analyze=analyze
        )
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweep.__main__ import to_config
        from sweep.launch import LauncherOptions, execute
        from sweep.plan import PlanError, build_plan

        assert self.config is not None and self.hydra_context is not None
        composed = compose_jobs(self.hydra_context, self.config, job_overrides)
        try:
            plan = build_plan([to_config(c) for c in composed], [list(o) for o in job_overrides])
        except PlanError as exc:
            raise SystemExit(f"error: {exc}") from None
        states = execute(plan, LauncherOptions(**self.options))
        returns = []
        for overrides, cfg in zip(job_overrides, composed, strict=True):
            ret = JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=cfg, working_dir=str(plan.dir))
            with open_dict(cfg):
                arm = OmegaConf.select(cfg, "arm")
            ret.return_value = states.get(str(arm), "planned")
            ret.status = JobStatus.COMPLETED
            returns.append(ret)
        if any(s in ("failed", "diverged", "skipped") for s in states.values()):
            raise SystemExit(1)
        return returns
