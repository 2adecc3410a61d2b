"""Writing `<sweep dir>/manifest.json` (its reader and format: records/manifest.py).

Written atomically under a file lock, so two invocations cannot tear or interleave it. An arm
whose signature changed keeps its old entries under `previous` (its old run dir stays on disk).
Paths inside the sweep dir are stored relative to it (records/manifest.py says why).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from records.atomic import write_json_atomic
from records.manifest import MANIFEST, map_paths, read_manifest

if TYPE_CHECKING:
    from sweep.plan import SweepPlan


def sweep_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every sweep tool shares: a sweep dir, or an experiment name under --root."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    parser.add_argument("sweep", help="a sweep dir, or an experiment name (looked up under --root)")
    parser.add_argument("--root", default="sweeps", help="where experiment names live (default: sweeps)")
    return parser


def sweep_dir_of(args: argparse.Namespace) -> Path:
    """The sweep dir `sweep_parser`'s arguments name (a dir with a manifest wins over a name)."""
    given = Path(args.sweep)
    return given if (given / MANIFEST).exists() else Path(args.root) / args.sweep


def record_plan(
    plan: SweepPlan, job_ids: dict[str, str] | None = None, executor: str = "local"
) -> dict[str, Any]:
    """Merge the plan (and new job ids) into the manifest; returns what was written. `executor`
    (local | slurm) is where its jobs run: `sweep.resubmit` and `sweep.cancel` follow it."""
    from slurm.environment import git_state

    plan.dir.mkdir(parents=True, exist_ok=True)
    path = plan.dir / MANIFEST
    with FileLock(str(path) + ".lock"):
        manifest: dict[str, Any] = read_manifest(plan.dir) if path.exists() else {"jobs": {}}
        manifest.update(
            experiment=plan.name,
            sweep_dir=str(plan.dir),
            pairs=plan.pairs,
            controls=plan.controls,
            yardstick=plan.yardstick,
            arms=plan.experiment_arms,
            cbs=plan.cbs,
            skip_tokens=plan.skip_tokens,
            decide=plan.decide,
            lr_ladders=plan.lr_ladders,
            executor=executor,
            ops={k: asdict(v) for k, v in plan.ops.items()},
            resources=asdict(plan.resources),
            git=git_state(),
            updated=time.time(),
        )
        for job in plan.jobs:
            entry = manifest["jobs"].get(job.name, {})
            if entry and entry.get("signature") != job.signature:
                previous = entry.pop("previous", [])
                entry = {"previous": [*previous, entry]}
            entry.update(
                kind=job.kind,
                signature=job.signature,
                run_dir=str(job.run_dir),
                depends_on=job.depends_on,
                overrides=job.overrides,
                derived=job.row,
                stage=asdict(job.stage),  # enough to resubmit without recomposing the config
            )
            entry.setdefault("job_ids", [])
            if job_ids and job.name in job_ids:
                entry["job_ids"].append(job_ids[job.name])
            manifest["jobs"][job.name] = entry
        for alias in plan.aliases:  # runs under another name too: shown, analysed, never submitted
            manifest["jobs"][alias.name] = {
                "kind": "arm",
                "same_as": alias.row["same_as"],
                "signature": alias.signature,
                "run_dir": str(alias.run_dir),
                "depends_on": [],
                "overrides": alias.overrides,
                "derived": alias.row,
                "job_ids": [],
            }
        here = plan.dir.absolute()
        portable = map_paths(
            json.loads(json.dumps(manifest)), lambda p: p.relative_to(here) if p.is_relative_to(here) else p
        )
        write_json_atomic(path, portable)
    return manifest


def add_job_id(sweep_dir: Path, name: str, job_id: str) -> None:
    """Record that job `name` runs as `job_id` (a local job's too: `sweep.status --tail` finds its log)."""
    path = Path(sweep_dir) / MANIFEST
    with FileLock(str(path) + ".lock"):
        raw = json.loads(path.read_text())
        raw["jobs"][name].setdefault("job_ids", []).append(job_id)
        write_json_atomic(path, raw)


def plan_from_manifest(sweep_dir: str | Path) -> SweepPlan:
    """The sweep as last recorded, rebuilt without recomposing its config (for resubmit and cancel)."""
    from sweep.plan import Job, SweepPlan
    from sweep.schema import ResourcesConfig
    from sweep.stage import StageJob
    from train.config import from_dict
    from train.rules import OperatingPoint

    manifest = read_manifest(sweep_dir)
    try:
        jobs = [
            Job(
                name,
                entry["kind"],
                entry["signature"],
                Path(entry["run_dir"]),
                from_dict(StageJob, entry["stage"]),
                entry["depends_on"],
                entry["overrides"],
                entry["derived"],
            )
            for name, entry in manifest["jobs"].items()
            if not entry.get("same_as")  # another name of a run that is planned under its own
        ]
        resources = from_dict(ResourcesConfig, manifest["resources"])
        ops = {k: from_dict(OperatingPoint, v) for k, v in manifest["ops"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{Path(sweep_dir) / MANIFEST} was written by another version of this code ({exc}): run the "
            "sweep command again, which records it anew (run dirs and job ids are kept)"
        ) from exc
    return SweepPlan(
        manifest["experiment"],
        Path(manifest["sweep_dir"]),
        jobs,
        manifest["pairs"],
        resources,
        ops,
        experiment_arms=manifest.get("arms", []),
        cbs=manifest.get("cbs", {}),
        skip_tokens=manifest.get("skip_tokens", 0),
        controls=manifest.get("controls", []),
        yardstick=manifest.get("yardstick", []),
        lr_ladders=manifest.get("lr_ladders", {}),
    )
