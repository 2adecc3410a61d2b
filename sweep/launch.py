"""Run or submit a plan's jobs through the backend of its executor (sweep/backend.py): locally
(and wait), or on SLURM (and return).

What to do with each job follows its state (`sweep.job_states`): completed jobs are skipped, pending
or running ones are left alone, failed / timeout / lost ones are (re)submitted and resume from
their newest checkpoint. A diverged arm would diverge again; it is rerun only when named.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from records.manifest import MANIFEST, read_manifest
from records.run_status import DONE, IN_FLIGHT, RESUBMIT, RunClaim, RunInUse, RunState
from sweep.backend import Backend, backend_for
from sweep.job_states import (
    JobState,
    sweep_states,
)
from sweep.manifest import record_plan
from sweep.plan import Job, SweepPlan, arm_table, gpu_hours


@dataclass
class LauncherOptions:
    executor: str = "local"  # local | slurm (sweep/backend.py)
    max_parallel: int = 0  # local: jobs running at once; 0: as many as this machine has CPUs for
    # local: threads per task. One each survives a busy machine (two threads of a job that shares
    # a core with another process wait on each other at every parallel region: 3.6x slower);
    # 0: an equal share of the CPUs free when the job starts.
    threads: int = 1
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
    backend = backend_for(opts.executor, opts.max_parallel, opts.poll_s, opts.threads)
    backend.queue()  # a SLURM sweep with no controller answering stops here, before anything is written
    # One sweep command at a time per sweep dir: a local sweep holds it while its jobs run, a SLURM
    # one while it decides and submits (a second waits, then sees the job ids and leaves them be).
    with sweep_claim(plan.dir, wait_s=backend.claim_wait_s):
        return _execute(plan, opts, backend)


def _execute(plan: SweepPlan, opts: LauncherOptions, backend: Backend) -> dict[str, RunState]:
    # The queue as it is now that this command holds the sweep: another command may just have
    # submitted jobs that the manifest now names.
    queue = backend.queue()
    try:
        mixed = branch_conflicts(plan)
        if mixed:
            head = "arms compared in a pair must start from the same weights:"
            raise SystemExit("error: " + "\n  ".join([head, *mixed]))
        manifest = record_plan(plan, executor=backend.name)
    except (OSError, ValueError) as exc:  # a full disk, a damaged manifest: say it, do not crash
        raise SystemExit(f"error: cannot record the sweep in {plan.dir}: {exc}") from None
    known = sweep_states(manifest, queue)
    todo = _todo(plan, known, opts.only)
    planned = {j.name for j in plan.jobs}
    states = {name: s.state for name, s in known.items() if name in planned}
    if not todo:
        print("nothing to run: every job of this sweep is completed, queued or running")
    else:
        mine = {name: state for name, state in known.items() if name in planned}  # not other sweeps' jobs
        states.update(backend.submit(plan, todo, mine, manifest))
    if backend.waits and opts.analyze and (plan.pairs or plan.controls):
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
    """Hold the sweep dir's claim (records.run_status.RunClaim on the sweep dir) for the block, waiting
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
        if state.state in DONE:
            notes["already completed, skipped"].append(
                f"{job.name}" + (" (decided)" if state.state == RunState.DECIDED else "")
            )
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
