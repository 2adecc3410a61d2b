"""`python -m sweep +experiment=NAME -m` runs the whole sweep; without `-m`, `arm=NAME` runs one arm here."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from records import config_dir
from sweep.compose import ConfigError, to_config
from sweep.schema import register

register()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    """Single-arm mode: run the arm (and the stages it needs that are not done) in the foreground."""
    from records.run_status import DONE
    from sweep.job_states import job_state
    from sweep.plan import PlanError, arm_table, build_plan

    if cfg.arm is None:
        sys.exit("error: choose an arm (arm=NAME), or run the whole sweep with -m")
    try:
        plan = build_plan([to_config(cfg)], [list(HydraConfig.get().overrides.task)])
    except (PlanError, ConfigError) as exc:
        sys.exit(f"error: {exc}")
    print(arm_table(plan), flush=True)
    if plan.dry_run:
        return
    from sweep.manifest import record_plan

    record_plan(plan)
    for job in plan.jobs:
        if (done := job_state(job.kind, job.run_dir).state) in DONE:
            print(f"{job.name}: already {done} ({job.run_dir})")
            continue
        print(f"{job.name}: running in the foreground ({job.run_dir})", flush=True)
        if job.stage.run is not None:
            job.stage.run.progress = True
        try:
            job.stage()
        except Exception as exc:  # the run recorded how it ended: say it in one line, not a traceback
            state = job_state(job.kind, job.run_dir, ended=True)
            how = "rerun the same command to resume from its last checkpoint"
            sys.exit(f"{job.name}: {state.state}: {state.reason or exc} ({how})")
        print(f"{job.name}: {job_state(job.kind, job.run_dir, ended=True).state}")


def _multirun_flag_first(argv: list[str]) -> list[str]:
    """Let `-m` stand anywhere (`python -m sweep +experiment=X -m a=b`).

    Hydra's argparse accepts overrides on one side of the flag only."""
    flags = [a for a in argv if a in ("-m", "--multirun")]
    return flags + [a for a in argv if a not in ("-m", "--multirun")]


def run() -> None:
    """`python -m sweep` and the `bss-sweep` console script."""
    from records.config_check import override_problems, yaml_problems
    from sweep.schema import Config

    problems = yaml_problems(sys.argv[1:], config_dir()) or override_problems(
        sys.argv[1:], Config, config_dir()
    )
    if problems:
        sys.exit("error: " + "; ".join(problems))
    sys.argv[1:] = _multirun_flag_first(sys.argv[1:])
    main()


if __name__ == "__main__":
    run()
