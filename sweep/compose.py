"""From Hydra's sweep to our plan: every job's config composed (fast where it can be), checked
as a whole, then run or submitted. `hydra_plugins/sweep_launcher` only calls `launch` here."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import shutil
import tempfile
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from records.run_status import NOT_DONE
from sweep.schema import Config


class ConfigError(ValueError):
    """A composed config the schema cannot take (an unknown key, an interpolation that fails)."""


def to_config(cfg: DictConfig) -> Config:
    """The typed Config of a composed Hydra config (the `hydra` node dropped).

    Raises ConfigError naming the key: Hydra's `+key=value` adds keys the schema does not have,
    and the typed object would drop them silently."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    unknown = unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError("unknown config key(s): " + "; ".join(unknown))
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as exc:  # OmegaConf's errors carry the key and the resolver's message
        raise ConfigError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    assert isinstance(obj, Config)
    return obj


def unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that the dataclass `schema` has no field for (with a suggestion)."""
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(schema)):
        return []
    hints = typing.get_type_hints(schema)
    out = []
    for key in map(str, node):
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            out.append(path + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        hint, value = hints[key], node._get_node(key)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if dataclasses.is_dataclass(hint):
            out += unknown_keys(value, hint, f"{path}.")
        elif isinstance(value, DictConfig) and typing.get_origin(hint) is dict and args:
            for name in map(str, value):  # a dict of dataclasses (ops, rules, arms)
                out += unknown_keys(value._get_node(name), args[-1], f"{path}.{name}.")
    return out


@contextlib.contextmanager
def scratch_sweep_dir(config: DictConfig) -> Iterator[None]:
    """Point Hydra's sweep dir (where it saves multirun.yaml before any job is composed) at a
    temporary directory, removed afterwards: the manifest is the sweep's record."""
    scratch = tempfile.mkdtemp(prefix="bss-hydra-")
    with open_dict(config):
        config.hydra.sweep.dir = scratch
    try:
        yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def launch(
    hydra_context: HydraContext,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    options: dict[str, object],
) -> list[JobReturn]:
    """Plan every job of the sweep (refusing it whole on any problem), then run or submit it.

    Exits 1 when a job ended failed, diverged or skipped; Hydra gets one JobReturn per job."""
    from sweep.launch import LauncherOptions, execute
    from sweep.plan import PlanError, build_plan

    composed = compose_jobs(hydra_context, config, job_overrides)
    try:
        plan = build_plan([to_config(c) for c in composed], [list(o) for o in job_overrides])
    except (PlanError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    states = execute(plan, LauncherOptions(**options))  # type: ignore[arg-type]
    returns = []
    for overrides, cfg in zip(job_overrides, composed, strict=True):
        ret = JobReturn(overrides=list(overrides), cfg=cfg, hydra_cfg=cfg, working_dir=str(plan.dir))
        with open_dict(cfg):
            arm = OmegaConf.select(cfg, "arm")
        ret.return_value = str(states.get(str(arm), "planned"))
        ret.status = JobStatus.COMPLETED
        returns.append(ret)
    if any(s in NOT_DONE for s in states.values()):
        raise SystemExit(1)
    return returns
