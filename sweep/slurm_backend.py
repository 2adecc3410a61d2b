"""The SLURM backend: a sweep's jobs submitted through submitit's SlurmExecutor, chained with
`afterok` dependencies, returning at once; its queue read by `squeue` (sweep/job_states.py);
cancelled with `scancel`. A job requeues itself on SLURM's warning (slurm/environment.py)."""

from __future__ import annotations

import subprocess
from typing import Any

from records.run_status import IN_FLIGHT, RunState
from sweep.job_states import STUCK, JobState, latest_job_ids, squeue_states, sweep_states
from sweep.manifest import record_plan
from sweep.plan import Job, SweepPlan


class SlurmBackend:
    """Submits and returns; `sweep.status` watches."""

    name = "slurm"
    claim_wait_s = 300.0  # a second sweep command waits, then finds the job ids and leaves them alone
    waits = False

    def queue(self) -> dict[str, Any] | None:
        queue = squeue_states()
        if queue is None:
            raise SystemExit("error: the sweep runs on SLURM but no SLURM controller answers `squeue` here")
        return queue

    def submit(
        self, plan: SweepPlan, todo: list[Job], known: dict[str, JobState], manifest: dict[str, Any]
    ) -> dict[str, RunState]:
        latest = latest_job_ids(manifest)
        in_flight = {n: latest[n] for n, s in known.items() if s.state in IN_FLIGHT and n in latest}
        stuck = [latest[j.name] for j in todo if known[j.name].reason == STUCK and j.name in latest]
        if stuck:  # queued behind a failed dependency: cancel before submitting the replacement
            subprocess.run(["scancel", *stuck], check=False)
        return _submit_slurm(plan, todo, in_flight)

    def cancel(self, manifest: dict[str, Any], only: set[str]) -> int:
        """scancel the queued and running jobs (all, or those in `only`)."""
        states = sweep_states(manifest, self.queue())
        latest = latest_job_ids(manifest)
        targets = {
            name: latest[name]
            for name, state in states.items()
            if state.state in IN_FLIGHT and name in latest and (not only or name in only)
        }
        if not targets:
            print("nothing to cancel")
            return 0
        subprocess.run(["scancel", *targets.values()], check=True)
        for name, job_id in targets.items():
            print(f"cancelled {name}: job {job_id}")
        return 0


def slurm_parameters(plan: SweepPlan, job: Job) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one job: one task per GPU (or tasks_per_node on CPU)."""
    res = plan.resources
    params: dict[str, Any] = {
        "job_name": f"{plan.name}:{job.name}",
        "nodes": res.nodes,
        "ntasks_per_node": res.gpus_per_node or res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.timeout_min,
        "signal_delay_s": res.signal_lead_s,  # --signal=USR2@lead: checkpoint, then requeue
        "additional_parameters": dict(res.additional),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = f"{res.mem_gb}G"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    if job.kind == "prepare":  # one task on CPUs, whatever the arms need; it tokenizes on every CPU it gets
        params.update(nodes=1, ntasks_per_node=1, cpus_per_task=res.prepare_cpus or res.cpus_per_task)
        params.pop("gpus_per_node", None)
    return params


def _submit_slurm(plan: SweepPlan, todo: list[Job], in_flight: dict[str, str]) -> dict[str, RunState]:
    """Submit every job in `todo`, chained with afterok dependencies on jobs still queued; return at once.

    With resources.array_parallelism > 0, arms that wait on the same jobs go in one job array.
    """
    import submitit

    ids = dict(in_flight)
    submitted: dict[str, str] = {}

    def executor_for(job: Job, deps: list[str]) -> Any:
        # A fresh executor per submission: parameters set on one (a dependency) must not leak.
        executor = submitit.SlurmExecutor(
            folder=plan.dir / "jobs", max_num_timeout=plan.resources.max_requeues
        )
        params = slurm_parameters(plan, job)
        if deps:
            params["dependency"] = "afterok:" + ":".join(deps)
        executor.update_parameters(**params)
        return executor

    arms = [j for j in todo if j.kind == "arm"]
    for job in todo:
        if job.kind == "arm" and plan.resources.array_parallelism > 0:
            continue
        deps = [ids[d] for d in job.depends_on if d in ids]
        ids[job.name] = submitted[job.name] = executor_for(job, deps).submit(job.stage).job_id
    if arms and plan.resources.array_parallelism > 0:
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in arms:
            groups.setdefault(tuple(ids[d] for d in job.depends_on if d in ids), []).append(job)
        for group_deps, group in groups.items():
            executor = executor_for(group[0], list(group_deps))
            executor.update_parameters(
                array_parallelism=plan.resources.array_parallelism, job_name=f"{plan.name}:arms"
            )
            with executor.batch():
                handles = [executor.submit(job.stage) for job in group]
            for job, handle in zip(group, handles, strict=True):
                submitted[job.name] = handle.job_id
    record_plan(plan, submitted, executor="slurm")
    for name, job_id in submitted.items():
        print(f"submitted {name}: job {job_id}")
    print(f"sweep dir: {plan.dir}\nwatch it:  python -m sweep.status {plan.dir}")
    return dict.fromkeys(submitted, RunState.PENDING)
