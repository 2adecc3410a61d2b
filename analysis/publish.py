"""Log a comparison to W&B as an `analysis` run in the sweep's group, beside the runs it judges."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.plots import FIGURES as IMAGES
from analysis.report import Tables


def publish(tables: Tables, out: Path, project: str, entity: str, group: str, mode: str) -> str:
    """Tables as `wandb.Table`, plots as images, verdicts in the summary; returns the run's path or dir."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=project,
        entity=entity or None,
        group=group,
        job_type="analysis",
        name=f"analysis-{group}",
        mode=mode,  # type: ignore[arg-type]  # checked by wandb.init
        dir=str(out),
        config={"source_dir": str(out)},
    )
    try:
        logged: dict[str, Any] = {}
        for name in ("pairs", "arms", "ranking", "bins"):
            df: pd.DataFrame = getattr(tables, name)
            if len(df):
                logged[name] = wandb.Table(dataframe=df.astype(object).where(df.notna(), None))
        for image in IMAGES:
            if (out / image).exists():
                logged[image.removesuffix(".png")] = wandb.Image(str(out / image))
        run.log(logged)
        for row in tables.pairs.to_dict("records"):
            run.summary[f"{row['metric']}/{row['pair']}/verdict"] = row["verdict"]
            run.summary[f"{row['metric']}/{row['pair']}/mean_gap"] = row["mean_gap"]
            if row.get("sequential"):  # the decision that stopped its arms (experiment.stop_when_decided)
                run.summary[f"{row['metric']}/{row['pair']}/sequential"] = row["sequential"]
                run.summary[f"{row['metric']}/{row['pair']}/decided_tokens"] = row["decided_tokens"]
        where = run.path if mode == "online" else str(Path(run.dir).parent)
    finally:
        run.finish()
    return str(where)
