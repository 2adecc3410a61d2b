"""Collect a sweep's arms from the W&B API, with a per-run parquet cache.

Runs are selected by entity/project, group (the sweep name), job type `arm` and optional config
filters. Each run's full history comes from its parquet history export
(`Run.download_history_exports`), and rows not exported yet (a live run) from `Run.scan_history`
past the last exported step; never from the sampled `Run.history()`.

Cache (`<cache_dir>/<run id>.parquet` + `.json`): a finished run whose last step is the cached one
is not fetched at all; a run that is still running (or logged more since) is fetched from its last
cached step on; a run whose history got shorter is fetched again whole. The data file is written
before its metadata, each atomically, so a crash leaves at worst a stale entry that is refetched.

Fetches run in a bounded thread pool. The W&B client retries HTTP 429 itself for a short while;
when it gives up, the fetch is retried here with exponential backoff (`backoff_s` x 2^attempt,
jittered) up to `attempts` times, then the collection fails naming the run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow.parquet as pq

from analysis.collect import LOGGED, ArmRows

T = TypeVar("T")
FINAL_STATES = {"finished", "crashed", "failed", "killed"}
KEEP = ["_step", *LOGGED]


@dataclass
class WandbSelection:
    entity: str
    project: str
    group: str
    filters: dict[str, Any] = field(
        default_factory=dict
    )  # extra W&B run filters, e.g. {"config.experiment": "x"}
    base_url: str = ""  # empty: the client's default (WANDB_BASE_URL or api.wandb.ai)
    workers: int = 8  # runs fetched at once
    backoff_s: float = 2.0  # first wait after a rate-limited attempt
    attempts: int = 6  # attempts per request before giving up


def _rate_limited(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if "429" in str(seen) or getattr(getattr(seen, "response", None), "status_code", None) == 429:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_backoff(call: Callable[[], T], what: str, sel: WandbSelection) -> T:
    """`call()`, retried with exponential backoff while W&B answers HTTP 429."""
    waited = 0.0
    for attempt in range(sel.attempts):
        try:
            return call()
        except Exception as exc:
            if not _rate_limited(exc):
                raise
            if attempt == sel.attempts - 1:
                raise RuntimeError(
                    f"W&B kept answering HTTP 429 (rate limited) for {what}: {sel.attempts} attempts over "
                    f"{waited:.0f} s of backoff; try again later or lower analysis.wandb.workers"
                ) from exc
            delay = sel.backoff_s * 2**attempt * (1 + 0.25 * random.random())
            waited += delay
            time.sleep(delay)
    raise AssertionError("unreachable")


def _frame(rows: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df[[c for c in KEEP if c in df.columns]]


class RunCache:
    """`<dir>/<run id>.parquet` (rows with `_step`) and `<run id>.json` (state, last step)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def load(self, run_id: str) -> tuple[dict[str, Any], pd.DataFrame] | None:
        meta_path, data_path = self.root / f"{run_id}.json", self.root / f"{run_id}.parquet"
        if not (meta_path.exists() and data_path.exists()):
            return None
        try:
            return json.loads(meta_path.read_text()), pd.read_parquet(data_path)
        except Exception as exc:  # a damaged entry is refetched, not trusted
            warnings.warn(
                f"W&B cache entry {data_path} unreadable ({exc}); fetching the run again", stacklevel=2
            )
            return None

    def save(self, run_id: str, meta: dict[str, Any], rows: pd.DataFrame) -> None:
        for suffix, write in (
            (".parquet", lambda p: rows.to_parquet(p, index=False)),
            (".json", lambda p: Path(p).write_text(json.dumps(meta))),
        ):
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            os.close(fd)
            write(tmp)
            os.replace(tmp, self.root / f"{run_id}{suffix}")


def fetch_history(run: Any, cache: RunCache, sel: WandbSelection) -> tuple[pd.DataFrame, str]:
    """(the run's rows with `_step`, how they were obtained: cached / tail / full)."""
    last_step = int((run.historyKeys or {}).get("lastStep", -1))
    cached = cache.load(run.id)
    if cached is not None:
        meta, rows = cached
        if meta["last_step"] == last_step and meta["state"] in FINAL_STATES and run.state == meta["state"]:
            return rows, "cached"
        if meta["last_step"] <= last_step:
            start = meta["last_step"] + 1
            tail = with_backoff(
                lambda: _frame(list(run.scan_history(min_step=start, page_size=10_000, use_cache=False))),
                f"run {run.id} (steps {start}..)",
                sel,
            )
            rows = pd.concat([rows, tail], ignore_index=True) if len(tail) else rows
            cache.save(run.id, {"state": run.state, "last_step": last_step}, rows)
            return rows, "tail"

    def download() -> pd.DataFrame:
        with tempfile.TemporaryDirectory() as tmp:
            result = run.download_history_exports(tmp, require_complete_history=False)
            paths = [str(p) for p in result.paths]
            rows = pq.read_table(paths).to_pandas() if paths else pd.DataFrame(columns=["_step"])
        rows = _frame(rows).sort_values("_step", kind="stable")
        if result.contains_live_data:  # rows logged since the last export
            start = int(rows["_step"].max()) + 1 if len(rows) else 0
            live = _frame(list(run.scan_history(min_step=start, page_size=10_000, use_cache=False)))
            rows = pd.concat([rows, live], ignore_index=True)
        return rows.reset_index(drop=True)

    rows = with_backoff(download, f"run {run.id}", sel)
    cache.save(run.id, {"state": run.state, "last_step": last_step}, rows)
    return rows, "full"


def _arm_rows(name: str, runs: list[tuple[Any, pd.DataFrame]]) -> ArmRows:
    """One arm from its W&B runs: the newest signature's runs, oldest segment first."""

    def signature(run: Any) -> str:
        return str((run.config.get("run") or {}).get("signature") or run.id)

    runs = sorted(runs, key=lambda r: str(r[0].created_at))
    newest = signature(runs[-1][0])
    dropped = sorted({signature(r) for r, _ in runs} - {newest})
    if dropped:
        warnings.warn(
            f"arm {name}: W&B holds runs of older configs ({', '.join(dropped)}); using {newest}",
            stacklevel=2,
        )
    kept = [(r, rows) for r, rows in runs if signature(r) == newest]
    last = kept[-1][0]
    row = dict(last.config.get("arm") or {})
    row.setdefault("batch_size", (last.config.get("run") or {}).get("batch_size"))
    rows = pd.concat([rows for _, rows in kept], ignore_index=True)
    if row["batch_size"] is None:
        raise LookupError(f"W&B run {last.id} (arm {name}) has no arm.batch_size in its config")
    return ArmRows.from_job(name, newest, row, str(last.state), rows.drop(columns="_step", errors="ignore"))


def collect_wandb(sel: WandbSelection, cache_dir: Path, progress: bool = True) -> list[ArmRows]:
    """Every arm run of the selection, merged per arm (see `_arm_rows`)."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    overrides = {"entity": sel.entity, **({"base_url": sel.base_url} if sel.base_url else {})}
    api = with_backoff(lambda: wandb.Api(overrides=overrides, timeout=60), "login", sel)
    filters = {"group": sel.group, "jobType": "arm", **sel.filters}
    path = f"{sel.entity}/{sel.project}"
    runs = with_backoff(
        lambda: list(api.runs(path, filters=filters, lazy=False, per_page=100)), "the run list", sel
    )
    if not runs:
        raise LookupError(f"W&B project {path} has no arm runs in group {sel.group!r} (filters {filters})")
    cache = RunCache(cache_dir)
    fetched: dict[str, list[tuple[Any, pd.DataFrame]]] = {}
    how: dict[str, int] = {}
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, sel.workers)) as pool:
        futures = {pool.submit(fetch_history, run, cache, sel): run for run in runs}
        bar = tqdm(
            as_completed(futures),
            total=len(futures),
            desc="W&B runs",
            unit="run",
            file=sys.stderr,
            disable=not progress,
        )
        for future in bar:
            run = futures[future]
            rows, kind = future.result()
            how[kind] = how.get(kind, 0) + 1
            fetched.setdefault(str(run.name), []).append((run, rows))
    counts = ", ".join(f"{n} {k}" for k, n in sorted(how.items()))
    print(f"W&B {path} group {sel.group}: {len(runs)} runs ({counts})")
    return [_arm_rows(name, runs) for name, runs in sorted(fetched.items())]
