"""Run or submit a plan's jobs through submitit: locally (and wait), or on SLURM (and return).

Jobs already done are skipped: the prepared data exists, or the run dir's `status.json` says
`completed`. Only the run's own status decides that, never the scheduler's exit state.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.manifest import record_plan
from sweep.plan import Job, SweepPlan, arm_table
from train.runlog import read_status

FAILED = ("failed", "diverged", "skipped")


@dataclass
class LauncherOptions:
    executor: str = "local"  # local | slurm
    max_parallel: int = 1  # local: jobs running at once (2 CPU cores fit one tiny arm well)
    poll_s: float = 0.5
    analyze: bool = True  # local: print the pairwise tables once the arms are done


def job_state(job: Job) -> str:
    """`completed` | `failed` | `diverged` | `running` | `pending`, from the job's own files."""
    if job.kind == "prepare":
        return "completed" if (job.run_dir / "meta.json").exists() else "pending"
    status = read_status(job.run_dir)
    return status["state"] if status else "pending"


def execute(plan: SweepPlan, opts: LauncherOptions) -> dict[str, str]:
    """Print the arm table, then run (local) or submit (slurm) what is not done. Returns job states."""
    print(f"sweep {plan.name}: {plan.dir}")
    print(arm_table(plan), flush=True)
    if plan.config.sweep.dry_run:
        plan.dir.mkdir(parents=True, exist_ok=True)
        keys = ["arm", "op", "rule", "batch_size", "seq_len", "micro_batch_size", "grad_accum", "lr", "beta1"]
        keys += ["beta2", "eps", "token_budget", "signature"]
        (plan.dir / "plan.json").write_text(
            json.dumps([{k: j.row[k] for k in keys} for j in plan.arms], indent=2)
        )
        print(f"dry run: wrote {plan.dir / 'plan.json'}; nothing was run")
        return {}
    states = {j.name: job_state(j) for j in plan.jobs}
    done = [n for n, s in states.items() if s == "completed"]
    if done:
        print(f"already completed, skipped: {', '.join(done)}")
    todo = [j for j in plan.jobs if states[j.name] != "completed"]
    record_plan(plan)
    if not todo:
        print("nothing to run: every job of this sweep is completed")
    elif opts.executor == "slurm":
        _submit_slurm(plan, todo)
        return states
    elif opts.executor == "local":
        states.update(_run_local(plan, todo, opts))
    else:
        raise ValueError(f"unknown executor {opts.executor!r} (local | slurm)")
    if opts.analyze and plan.pairs:
        from analysis.report import analyze

        analyze(plan.dir)
    return states


def _resources(plan: SweepPlan) -> dict[str, Any]:
    res = plan.config.resources
    return {
        "timeout_min": res.timeout_min,
        "tasks_per_node": res.gpus_per_node or res.tasks_per_node,
        "gpus_per_node": res.gpus_per_node,
    }


def _run_local(plan: SweepPlan, todo: list[Job], opts: LauncherOptions) -> dict[str, str]:
    """Run jobs as local submitit processes, dependencies first, with a progress bar per job."""
    import submitit
    from tqdm import tqdm

    executor = submitit.LocalExecutor(folder=plan.dir / "jobs")
    executor.update_parameters(**_resources(plan))
    states = {j.name: "pending" for j in todo}
    pending = list(todo)
    running: dict[str, tuple[Job, Any, Any]] = {}
    position = 0
    try:
        while pending or running:
            for name, (job, handle, bar) in list(running.items()):
                status = read_status(job.run_dir) or {}
                if bar is not None and status.get("tokens") is not None:
                    bar.update(status["tokens"] - bar.n)
                    if status.get("loss") is not None:
                        bar.set_postfix(loss=f"{status['loss']:.4f}", refresh=False)
                if handle.done():
                    states[name] = _finished_state(job, handle)
                    if bar is not None:
                        bar.close()
                    print(f"{name}: {states[name]}", flush=True)
                    del running[name]
            for job in list(pending):
                if len(running) >= opts.max_parallel:
                    break
                dep_states = [states.get(d, "completed") for d in job.depends_on]
                if any(s in FAILED for s in dep_states):
                    states[job.name] = "skipped"
                    print(f"{job.name}: skipped (a job it depends on did not complete)", flush=True)
                    pending.remove(job)
                elif all(s == "completed" for s in dep_states):
                    handle = executor.submit(job.stage)
                    budget = job.stage.run.token_budget if job.stage.run else None
                    bar = None
                    if budget:
                        # disable=None: a bar on a terminal, plain start/end lines in a log file.
                        bar = tqdm(
                            total=budget,
                            desc=f"{job.name:>8}",
                            unit="tok",
                            unit_scale=True,
                            position=position,
                            leave=True,
                            dynamic_ncols=True,
                            disable=None,
                        )
                        position += 1
                    if bar is None or bar.disable:
                        print(
                            f"{job.name}: running (local job {handle.job_id}, log {handle.paths.stderr})",
                            flush=True,
                        )
                    running[job.name] = (job, handle, bar)
                    pending.remove(job)
            time.sleep(opts.poll_s)
    except KeyboardInterrupt:
        for _, handle, _ in running.values():
            handle.cancel(check=False)
        raise
    failed = {n: s for n, s in states.items() if s in FAILED}
    if failed:
        print("not completed: " + ", ".join(f"{n} ({s})" for n, s in failed.items()), file=sys.stderr)
    return states


def _finished_state(job: Job, handle: Any) -> str:
    state = job_state(job)
    if state == "completed":
        return state
    state = state if state in ("failed", "diverged") else "failed"
    status = read_status(job.run_dir) if job.kind != "prepare" else None
    error = (status or {}).get("error")
    if not error:
        exc = handle.exception()
        error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            if exc
            else ""
        )
    log = Path(handle.paths.stderr)
    print(f"{job.name}: {state}: {error}\n  log: {log}", file=sys.stderr)
    return state


def _submit_slurm(plan: SweepPlan, todo: list[Job]) -> dict[str, str]:
    """Submit every job not done, chained with afterok dependencies; return at once."""
    import submitit

    res = plan.config.resources
    params: dict[str, Any] = {
        "nodes": res.nodes,
        "ntasks_per_node": res.gpus_per_node or res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.timeout_min,
        "additional_parameters": dict(res.additional),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = f"{res.mem_gb}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    ids: dict[str, str] = {}
    for job in todo:
        deps = [ids[d] for d in job.depends_on if d in ids]
        job_params = dict(params, job_name=f"{plan.name}:{job.name}")
        if job.kind == "prepare":  # tokenizing is one process, whatever the arms need
            job_params.update(nodes=1, ntasks_per_node=1)
            job_params.pop("gpus_per_node", None)
        if deps:
            job_params["dependency"] = "afterok:" + ":".join(deps)
        # A fresh executor per job: parameters set on one (a dependency) must not leak to the next.
        executor = submitit.SlurmExecutor(folder=plan.dir / "jobs")
        executor.update_parameters(**job_params)
        ids[job.name] = executor.submit(job.stage).job_id
    record_plan(plan, ids)
    for name, job_id in ids.items():
        print(f"submitted {name}: job {job_id}")
    print(f"sweep dir: {plan.dir}\nwatch it:  python -m sweep.status {plan.dir}")
    return {name: "submitted" for name in ids}
