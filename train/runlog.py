"""What a run tells the world (rank 0 only): `status.json`, `metrics.jsonl` and its W&B run.

`metrics.jsonl` (its format and schema: records/metrics.py) is the source of truth; W&B mirrors
it, and a W&B failure is a warning, never a reason to stop training.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from records.metrics import METRICS_FILE, VAL_SEQUENCES, read_metrics, truncate_metrics
from records.run_status import DONE, RunState, write_status
from train.config import RunConfig, WandbMode


class RunLog:
    """Status, metrics file and W&B for one run, continuing after `resume_step` (-1: from scratch).

    Construct it on rank 0 only."""

    HEARTBEAT_S = 2.0

    def __init__(
        self, cfg: RunConfig, total_steps: int, resume_step: int, distributed: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.distributed = distributed or {}  # ranks, hosts, backend and why (train/distributed.py)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.status: dict[str, Any] = {
            "name": cfg.name,
            "stage": cfg.stage,
            "signature": cfg.signature,
            "state": RunState.RUNNING,
            "step": 0,
            "total_steps": total_steps,
            "tokens": 0,
            "token_budget": cfg.token_budget,
            "loss": None,
            "tokens_per_s": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "heartbeat": time.time(),
            "error": None,
            "launch": cfg.launch,
            "distributed": self.distributed,
        }
        self._last_beat = 0.0
        # Rows past the checkpoint we resume from are superseded by the rows this run will log.
        truncate_metrics(self.run_dir, resume_step)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 - line-buffered
        self._wandb: Any = self._start_wandb()
        if self._wandb is not None and cfg.wandb.mode == "offline":
            self._continue_offline_history()

    @property
    def wandb_id(self) -> str:
        """The W&B run id: the signature, so every restart and resubmission continues the same run."""
        return self.cfg.signature

    def _wandb_config(self) -> dict[str, Any]:
        """The resolved run config (derived hyperparameters included), where and how it was launched,
        and over which backend its ranks talk."""
        run = asdict(self.cfg)
        for key in ("extra_config", "launch", "wandb"):
            run.pop(key)
        return {
            **self.cfg.extra_config,
            "run": run,
            "launch": self.cfg.launch,
            "distributed": self.distributed,
        }

    def _start_wandb(self) -> Any:
        if self.cfg.wandb.mode == "disabled":
            return None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run = wandb.init(
                id=self.wandb_id,
                resume="allow",
                mode=cast(WandbMode, self.cfg.wandb.mode),  # checked by RunConfig.validate
                project=self.cfg.wandb.project,
                entity=self.cfg.wandb.entity or None,
                group=self.cfg.sweep_name or None,
                job_type=self.cfg.stage,
                name=self.cfg.name,
                tags=list(self.cfg.tags),
                dir=str(self.run_dir),
            )
            # After a requeue the launch facts (job id, restarts) change: they overwrite the old ones.
            run.config.update(self._wandb_config(), allow_val_change=True)
            if self.cfg.wandb.mode == "online":
                self.status["wandb_path"] = run.path  # entity/project/run id, for `sweep.status`
            run.define_metric("tokens")
            run.define_metric("*", step_metric="tokens")
            return run
        except Exception as exc:
            warnings.warn(f"W&B unavailable, logging to {METRICS_FILE} only: {exc}", stacklevel=2)
            return None

    def _wandb_call(self, what: str, call: Any) -> None:
        """Run a W&B call; on any failure warn once and go on without W&B (the metrics file stays)."""
        if self._wandb is None:
            return
        try:
            call(self._wandb)
        except Exception as exc:
            warnings.warn(f"W&B {what} failed, continuing with {METRICS_FILE} only: {exc}", stacklevel=3)
            self._wandb = None

    def _continue_offline_history(self) -> None:
        """Make this attempt's offline W&B dir hold the run's whole history, so that syncing it
        alone gives one continuous run.

        Every attempt of an offline run writes its own `offline-run-<time>-<id>` dir, and `wandb
        sync` of several dirs of one id keeps only the last one's history (wandb/wandb#3841,
        #5865). So the rows up to the checkpoint resumed from (from `metrics.jsonl`, the source of
        truth; none when starting over) are logged again here at their own steps, and the earlier
        attempts' dirs are moved to `wandb/superseded/` (kept, never synced by `wandb sync <run
        dir>/wandb/offline-run-*`)."""
        for row in read_metrics(self.run_dir):
            self._wandb_log(row)
        current = Path(self._wandb.dir).parent if self._wandb is not None else None
        superseded = self.run_dir / "wandb" / "superseded"
        for old in sorted((self.run_dir / "wandb").glob(f"offline-run-*-{self.wandb_id}")):
            if old != current:
                superseded.mkdir(exist_ok=True)
                os.replace(old, superseded / old.name)

    def log(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._wandb_log(row)

    def _wandb_log(self, row: dict[str, Any]) -> None:
        """One row to W&B at its optimizer step (its `_step`), so that a resumed run's rows land
        on the steps they belong to: online, W&B drops a row whose step is below the run's current
        one, so the rows a resumed attempt logs again (the same: resume is exact) do not repeat."""
        scalars = {k: v for k, v in row.items() if k != VAL_SEQUENCES}
        self._wandb_call("log", lambda run: run.log(scalars, step=int(row["step"])))

    def summary(self, fields: dict[str, Any]) -> None:
        """Set `fields` in the W&B run's summary (the sequential verdict at each look)."""
        self._wandb_call("summary", lambda run: run.summary.update(fields))

    def update(self, force: bool = False, **fields: Any) -> None:
        """Merge `fields` into status.json; rewritten at most every HEARTBEAT_S unless forced."""
        self.status.update(fields)
        now = time.time()
        if force or now - self._last_beat >= self.HEARTBEAT_S:
            self.status["heartbeat"] = now
            write_status(self.run_dir, self.status)
            self._last_beat = now

    def close(self, state: RunState, error: str | None = None) -> None:
        self.update(force=True, state=state, error=error, finished=time.time())
        self._metrics.close()
        if state in (RunState.FAILED, RunState.DIVERGED):
            title = f"{self.cfg.sweep_name}/{self.cfg.name} {state}"
            self._wandb_call("alert", lambda run: run.alert(title=title, text=error or state))
        exit_code = 0 if state in DONE else 1
        self._wandb_call("finish", lambda run: run.finish(exit_code=exit_code))
