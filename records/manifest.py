"""`<sweep dir>/manifest.json`: what a sweep is made of and every job id each part has had.

The sweep writes it (sweep/manifest.py: atomically, under a file lock); `sweep.status`,
`sweep.resubmit`, `sweep.cancel` and the analysis read it here. Per job: kind, signature, run dir,
dependencies, overrides, the arm table's row (`derived`: derived hyperparameters, `base`,
`variant`, `replicate`, `branch`), the stage to resubmit and its job ids; per sweep: the
experiment, its pairs, controls, yardstick, lr ladders, arms, batch ladder, branch transient and
executor.

Paths inside the sweep dir are stored relative to it and resolved against the dir the manifest is
read from, so a sweep dir copied or moved (`cp -r`, another file system) acts on its own runs,
never on the original's. Manifests written before paths were relative hold absolute ones: those
under the dir they were recorded in are rebased onto the dir they are read from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


# Where a job entry holds paths (the prepare job's are the data cache's, outside the sweep dir).
PATH_FIELDS = (
    ("run_dir",),
    ("stage", "run", "run_dir"),
    ("stage", "run", "init_checkpoint"),
    ("stage", "run", "data_dir"),
    ("stage", "data", "cache_dir"),
)


def map_paths(manifest: dict[str, Any], change: Callable[[Path], Path]) -> dict[str, Any]:
    """`manifest` with `change(path)` applied to every non-empty path of every job entry."""
    for entry in manifest.get("jobs", {}).values():
        for record in [entry, *entry.get("previous", [])]:
            for fields in PATH_FIELDS:
                node = record
                for key in fields[:-1]:
                    node = node.get(key) or {}
                if node.get(fields[-1]):
                    node[fields[-1]] = str(change(Path(node[fields[-1]])))
    return manifest


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    """The manifest of `sweep_dir`, its paths absolute and in this dir (see the module doc)."""
    here = Path(sweep_dir).absolute()
    path = here / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{sweep_dir} holds no {MANIFEST}: not a sweep dir (run the sweep first)")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        recorded = Path(manifest.get("sweep_dir") or here)
        manifest["jobs"]  # noqa: B018 - a manifest without jobs is not one
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path} is damaged ({exc}); it is written atomically, so something else changed it: "
            "restore it from a backup, or move it away and run the sweep command again (it records a "
            "new one; finished runs are found by their signatures)"
        ) from None

    def resolve(p: Path) -> Path:
        if not p.is_absolute():
            return here / p
        if recorded != here and p.is_relative_to(recorded):  # an old manifest of a moved sweep dir
            return here / p.relative_to(recorded)
        return p

    manifest["sweep_dir"] = str(here)
    return map_paths(manifest, resolve)
