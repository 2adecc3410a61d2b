"""The files one package writes for another, with their readers: the one owner of each.

- `run_status`: `<run dir>/status.json` and the run's claim (`.owner`): how a run stands. The
  trainer writes it; the sweep's tools and the analysis read it.
- `metrics`: `<run dir>/metrics.jsonl` and its schema, `FIELDS` (every key a row may hold: unit,
  meaning, whether the analysis reads it). The trainer writes it; the analysis reads it.
- `manifest`: `<sweep dir>/manifest.json`'s reader. The sweep writes it; status, resubmit, cancel
  and the analysis read it.
- `atomic`: the atomic JSON write all of them use; `config_dir()`: the project's `conf/`.

Nothing here imports torch or any other package of this project: a login node, the analysis and
every package read these files through this one, and the package graph has no cycle.
"""

from pathlib import Path


def config_dir() -> str:
    """conf/: beside the packages in a checkout, inside this package in an installed wheel (the
    wheel carries it there: pyproject's force-include)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")
