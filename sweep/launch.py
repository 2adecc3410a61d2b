"""Run or submit a plan's jobs through submitit: locally (and wait), or on SLURM (and return).

What to do with each job follows its state (`sweep.state`): completed jobs are skipped, pending
or running ones are left alone, failed / timeout / lost ones are (re)submitted and resume from
their newest checkpoint. A diverged arm would diverge again; it is rerun only when named.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sweep.manifest import MANIFEST, add_job_id, read_manifest, record_plan
from sweep.plan import Job, SweepPlan, arm_table, gpu_hours
from sweep.state import (
    STUCK,
    JobState,
    job_state,
    latest_job_ids,
    read_own_status,
    squeue_states,
    sweep_states,
)
from train.status import IN_FLIGHT, NOT_DONE, RESUBMIT, RunClaim, RunInUse, RunState, claimed_by


@dataclass
class LauncherOptions:
    executor: str = "local"  # local | slurm
    max_parallel: int = 0  # local: jobs running at once; 0: as many as this machine has CPUs for
    poll_s: float = 0.5
    analyze: bool = True  # local: print the pairwise tables once the arms are done
    only: list[str] = field(default_factory=list)  # consider only these jobs (resubmit --arms)


def execute(plan: SweepPlan, opts: LauncherOptions) -> dict[str, RunState]:
    """Print the arm table, then run (local) or submit (slurm) what needs it. Returns job states."""
    print(f"sweep {plan.name}: {plan.dir}")
    print(arm_table(plan), flush=True)
    if plan.dry_run:
        plan.dir.mkdir(parents=True, exist_ok=True)
        keys = ["arm", "op", "rule", "batch_size", "seq_len", "micro_batch_size", "grad_accum", "lr", "beta1"]
        keys += ["beta2", "eps", "token_budget", "flops", "signature"]
        hours = (lambda f: gpu_hours(f, plan.resources)) if plan.resources.gpus_per_node else lambda f: None
        rows = [{**{k: j.row[k] for k in keys}, "gpu_hours": hours(j.row["flops"])} for j in plan.arms]
        (plan.dir / "plan.json").write_text(json.dumps(rows, indent=2))
        print(f"dry run: wrote {plan.dir / 'plan.json'}; nothing was run")
        return {}
    if opts.executor not in ("local", "slurm"):
        raise ValueError(f"unknown executor {opts.executor!r} (local | slurm)")
    queue = squeue_states() if opts.executor == "slurm" else None
    if opts.executor == "slurm" and queue is None:
        raise SystemExit("error: hydra/launcher=slurm but no SLURM controller answers `squeue` here")
    # One sweep command at a time per sweep dir: a local sweep holds it while its jobs run, a SLURM
    # one while it decides and submits (a second waits, then sees the job ids and leaves them be).
    with sweep_claim(plan.dir, wait_s=0 if opts.executor == "local" else 300):
        return _execute(plan, opts)


def _execute(plan: SweepPlan, opts: LauncherOptions) -> dict[str, RunState]:
    # The queue as it is now that this command holds the sweep: another command may just have
    # submitted jobs that the manifest now names.
    queue = squeue_states() if opts.executor == "slurm" else None
    try:
        mixed = branch_conflicts(plan)
        if mixed:
            head = "arms compared in a pair must start from the same weights:"
            raise SystemExit("error: " + "\n  ".join([head, *mixed]))
        manifest = record_plan(plan, executor=opts.executor)
    except (OSError, ValueError) as exc:  # a full disk, a damaged manifest: say it, do not crash
        raise SystemExit(f"error: cannot record the sweep in {plan.dir}: {exc}") from None
    known = sweep_states(manifest, queue)
    todo = _todo(plan, known, opts.only)
    planned = {j.name for j in plan.jobs}
    states = {name: s.state for name, s in known.items() if name in planned}
    if not todo:
        print("nothing to run: every job of this sweep is completed, queued or running")
    elif opts.executor == "slurm":
        latest = latest_job_ids(manifest)
        in_flight = {n: latest[n] for n, s in known.items() if s.state in IN_FLIGHT and n in latest}
        stuck = [latest[j.name] for j in todo if known[j.name].reason == STUCK and j.name in latest]
        if stuck:  # queued behind a failed dependency: cancel before submitting the replacement
            subprocess.run(["scancel", *stuck], check=False)
        states.update(_submit_slurm(plan, todo, in_flight))
        return states
    else:
        states.update(_run_local(plan, todo, states, opts))
    if opts.analyze and plan.pairs:
        from analysis.report import analyze

        try:
            analyze(plan.dir)
        except (LookupError, ValueError, OSError) as exc:  # the runs are done; the tables can wait
            print(
                f"analysis: {exc} (run `python -m analysis` when there is something to compare)",
                file=sys.stderr,
            )
    return states


def branch_conflicts(plan: SweepPlan) -> list[str]:
    """Pairs (declared pairs, controls, yardstick) of which this plan runs one arm from other
    weights than the other arm already recorded in the sweep (a rerun whose config redid the
    warmup): their comparison would be meaningless, so the plan is refused before anything runs."""
    if not (plan.dir / MANIFEST).exists():
        return []
    recorded = {
        (d.get("base"), d.get("variant", ""), d.get("replicate", "")): (name, d.get("branch", ""))
        for name, job in read_manifest(plan.dir)["jobs"].items()
        if job["kind"] == "arm" and not job.get("same_as")
        for d in [job.get("derived", {})]
    }
    planned = {(j.row["base"], j.row["variant"], j.row["replicate"]): j for j in plan.arms}
    out = []
    for a, b in [*plan.pairs, *plan.controls, *plan.yardstick]:
        for (base, variant, replicate), job in planned.items():
            other = (b if base == a else a, variant, replicate) if base in (a, b) else None
            if other is None or other in planned or other not in recorded:
                continue
            name, branch = recorded[other]
            if branch and branch != job.row["branch"]:
                out.append(
                    f"{job.name} would start from {job.row['branch']}, but {name} (pair {a}-{b}) started "
                    f"from {branch}: run both with this config (arm={job.name},{name} ...), or use "
                    "another sweep.dir"
                )
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def sweep_claim(sweep_dir: Path, wait_s: float) -> Iterator[None]:
    """Hold the sweep dir's claim (train.status.RunClaim on the sweep dir) for the block, waiting
    up to `wait_s` for another sweep command to let go of it."""
    claim = RunClaim(sweep_dir)
    deadline = time.time() + wait_s
    while True:
        try:
            claim.acquire(command=" ".join(sys.argv))
            break
        except RunInUse as exc:
            if time.time() >= deadline:
                raise SystemExit(
                    f"error: another sweep command is working on this sweep: {exc}. A local sweep runs "
                    f"its jobs in the foreground: wait for it, or follow it with `python -m sweep.status "
                    f"{sweep_dir}`"
                ) from None
            time.sleep(1.0)
    try:
        yield
    finally:
        claim.release()


def _todo(plan: SweepPlan, known: dict[str, JobState], only: list[str]) -> list[Job]:
    """Jobs to (re)submit, saying what happens to the others."""
    todo: list[Job] = []
    notes: dict[str, list[str]] = {"already completed, skipped": [], "left alone": []}
    for job in plan.jobs:
        state = known[job.name]
        named = job.name in only
        if only and not named and job.kind == "arm":
            continue
        if state.state == RunState.COMPLETED:
            notes["already completed, skipped"].append(job.name)
        elif state.state in IN_FLIGHT and not state.unsubmitted:
            notes["left alone"].append(f"{job.name} ({state.state})")
        elif state.state in RESUBMIT or state.unsubmitted or named:
            if state.state in RESUBMIT:
                print(
                    f"{job.name}: {state.state} ({state.reason}): resubmitting (resumes from its checkpoint)"
                )
            todo.append(job)
        else:
            notes["left alone"].append(f"{job.name} ({state.state}: rerun it by name)")
    for what, names in notes.items():
        if names:
            print(f"{what}: {', '.join(names)}")
    return todo


def _run_local(
    plan: SweepPlan, todo: list[Job], known: dict[str, RunState], opts: LauncherOptions
) -> dict[str, RunState]:
    """Run jobs as local submitit processes, dependencies first, with a progress bar per job."""
    local = _LocalRun(plan, todo, known, opts.max_parallel)
    try:
        while local.pending or local.running:
            local.collect_finished()
            local.start_ready()
            time.sleep(opts.poll_s)
    except KeyboardInterrupt:
        local.stop()
        raise SystemExit(1) from None
    failed = {n: s for n, s in local.states.items() if s in NOT_DONE}
    if failed:
        print("not completed: " + ", ".join(f"{n} ({s})" for n, s in failed.items()), file=sys.stderr)
    return local.states


class _LocalRun:
    """The jobs of a local sweep: waiting (`pending`), running (with their handle and bar), done."""

    def __init__(self, plan: SweepPlan, todo: list[Job], known: dict[str, RunState], max_parallel: int):
        import submitit

        self.executor = submitit.LocalExecutor(folder=plan.dir / "jobs")
        res = plan.resources
        self.executor.update_parameters(
            timeout_min=res.timeout_min,
            tasks_per_node=res.gpus_per_node or res.tasks_per_node,
            gpus_per_node=res.gpus_per_node,
            signal_delay_s=res.signal_lead_s,
        )
        self.cpus = len(os.sched_getaffinity(0))
        self.max_parallel = max_parallel or self.cpus
        self.tasks = res.gpus_per_node or res.tasks_per_node
        self.dir = plan.dir
        self.states = {**known, **{j.name: RunState.PENDING for j in todo}}
        self.pending = list(todo)
        self.running: dict[str, tuple[Job, Any, Any]] = {}
        self.given: dict[str, int] = {}  # CPUs each running job was given
        self.bars = 0

    def collect_finished(self) -> None:
        """Move every bar on; record the end state of jobs whose process returned."""
        for name, (job, handle, bar) in list(self.running.items()):
            status = read_own_status(job.kind, job.run_dir) or {}
            if bar is not None and status.get("tokens") is not None:
                bar.update(status["tokens"] - bar.n)
                if status.get("loss") is not None:
                    bar.set_postfix(loss=f"{status['loss']:.4f}", refresh=False)
            if handle.done():
                self.states[name] = _finished_state(job, handle)
                if bar is not None:
                    bar.close()
                print(f"{name}: {self.states[name]}", flush=True)
                del self.running[name]
                self.given.pop(name, None)

    def start_ready(self) -> None:
        """Start jobs whose dependencies completed, up to `max_parallel` and the CPUs free; skip
        those whose failed. Each job gets an equal share of the free CPUs among the jobs ready now
        (the warmup, alone, gets them all; arms after it one each on 2 cores), as its threads."""
        ready = sum(all(self.states.get(d) == RunState.COMPLETED for d in j.depends_on) for j in self.pending)
        for job in list(self.pending):
            free = self.cpus - sum(self.given.values())
            if len(self.running) >= self.max_parallel or (self.running and free < self.tasks):
                return
            waiting_on = set(self.running) | {p.name for p in self.pending}
            done = [self.states.get(d) for d in job.depends_on]
            blocked = [d for d, s in zip(job.depends_on, done, strict=True) if s != RunState.COMPLETED]
            if any(d not in waiting_on for d in blocked):
                failed = next(d for d in blocked if d not in waiting_on)
                self.states[job.name] = RunState.SKIPPED
                print(f"{job.name}: skipped ({failed}: {self.states.get(failed)})", flush=True)
                self.pending.remove(job)
            elif not blocked and (owner := claimed_by(job.run_dir)) is not None:
                # Another process trains this run (an earlier launcher's orphan, a manual start).
                self.states[job.name] = RunState.RUNNING
                print(f"{job.name}: already running elsewhere ({owner}): not started again", flush=True)
                self.pending.remove(job)
            elif not blocked:
                share = cpu_share(free, ready, self.max_parallel - len(self.running), self.tasks)
                ready -= 1
                self.given[job.name] = share
                stage = replace(job.stage, threads=max(1, share // self.tasks))
                # The job ignores SIGINT (inherited): Ctrl-C reaches this launcher only, which then
                # stops its jobs cleanly (SIGTERM: checkpoint at the next step) instead of killing them.
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    handle = self.executor.submit(stage)
                finally:
                    signal.signal(signal.SIGINT, previous)
                add_job_id(self.dir, job.name, str(handle.job_id))
                bar = self._bar(job)
                if bar is None or bar.disable:
                    print(
                        f"{job.name}: running (local job {handle.job_id}, log {handle.paths.stderr})",
                        flush=True,
                    )
                self.running[job.name] = (job, handle, bar)
                self.pending.remove(job)

    def stop(self, grace_s: float = 300.0) -> None:
        """Ctrl-C: ask every running job to stop (SIGTERM: each checkpoints at its next step and
        exits), wait for them, and say what happened and how to go on."""
        print(
            "\ninterrupted: stopping the running jobs at their next step (checkpointed)...", file=sys.stderr
        )
        for _, handle, _ in self.running.values():
            if handle._process is not None:  # submitit's controller forwards SIGTERM to its tasks
                handle._process.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        while self.running and time.time() < deadline:
            self.collect_finished()
            time.sleep(0.2)
        for name in self.running:
            print(
                f"{name}: did not stop within {grace_s:.0f} s; it goes on in the background", file=sys.stderr
            )
        print("resume with the same command: finished jobs are skipped, stopped ones resume", file=sys.stderr)

    def _bar(self, job: Job) -> Any:
        """A progress bar over the job's tokens; disable=None: a bar on a terminal, plain start/end
        lines in a log file. None for the prepare job (no token budget)."""
        from tqdm import tqdm

        if job.stage.run is None:
            return None
        self.bars += 1
        return tqdm(
            total=job.stage.run.token_budget,
            desc=f"{job.name:>8}",
            unit="tok",
            unit_scale=True,
            position=self.bars - 1,
            leave=True,
            dynamic_ncols=True,
            disable=None,
        )


def cpu_share(free: int, ready: int, slots: int, tasks: int) -> int:
    """CPUs for a job starting now: an equal share of the `free` ones among the jobs that can start
    now (`ready`, at most `slots` more), at least one per task. The warmup, alone, gets them all;
    five arms ready after it on 2 cores run two at a time with one each."""
    return max(tasks, free // max(1, min(ready, slots)))


def _finished_state(job: Job, handle: Any) -> RunState:
    """How a local job ended, by the same resolver as every other job (its process has ended)."""
    state = job_state(job.kind, job.run_dir, ended=True)
    if state.state == RunState.COMPLETED:
        return state.state
    error = state.reason
    if not (state.status or {}).get("error"):  # the run wrote no error: the job log's last line
        error = _last_error(Path(handle.paths.stderr)) or error
    print(f"{job.name}: {state.state}: {error}\n  log: {Path(handle.paths.stderr)}", file=sys.stderr)
    return state.state


def _last_error(log: Path) -> str:
    """The last line of a job's log that names an exception (`SomeError: what`), or ""."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line.strip()
    return ""


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
