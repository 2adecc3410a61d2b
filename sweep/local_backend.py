"""The local backend: a sweep's jobs as submitit LocalExecutor processes on this machine, run
in the foreground (dependencies first, side by side as the CPUs allow, each with a progress bar),
stopped by SIGTERM (each trainer checkpoints at its next step)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from records.run_status import DONE, NOT_DONE, RunState, claimant, claimed_by
from sweep.job_states import JobState, job_state, read_own_status
from sweep.manifest import add_job_id
from sweep.plan import Job, SweepPlan


class LocalBackend:
    """Runs the jobs here and waits for them (so the sweep command can print the tables after)."""

    name = "local"
    claim_wait_s = 0.0  # a second sweep command leaves at once: this one runs the jobs in the foreground
    waits = True

    def __init__(self, max_parallel: int = 0, poll_s: float = 0.5, threads: int = 1) -> None:
        self.max_parallel = max_parallel
        self.poll_s = poll_s
        self.threads = threads

    def queue(self) -> dict[str, Any] | None:
        return None  # no scheduler: a run's own status and claim say how it stands

    def submit(
        self, plan: SweepPlan, todo: list[Job], known: dict[str, JobState], manifest: dict[str, Any]
    ) -> dict[str, RunState]:
        """Run jobs as local submitit processes, dependencies first, with a progress bar per job."""
        local = _LocalRun(plan, todo, {n: s.state for n, s in known.items()}, self.max_parallel, self.threads)
        try:
            while local.pending or local.running:
                local.collect_finished()
                local.start_ready()
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            local.stop()
            raise SystemExit(1) from None
        failed = {n: s for n, s in local.states.items() if s in NOT_DONE}
        if failed:
            print("not completed: " + ", ".join(f"{n} ({s})" for n, s in failed.items()), file=sys.stderr)
        return local.states

    def cancel(self, manifest: dict[str, Any], only: set[str]) -> int:
        return _stop_local(manifest, only)


class _LocalRun:
    """The jobs of a local sweep: waiting (`pending`), running (with their handle and bar), done."""

    def __init__(
        self, plan: SweepPlan, todo: list[Job], known: dict[str, RunState], max_parallel: int, threads: int
    ):
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
        self.tasks = res.gpus_per_node or res.tasks_per_node
        self.threads = threads  # per task; 0: an equal share of the free CPUs (`cpu_share`)
        # An explicit max_parallel is honoured even past the CPUs; so is a sweep whose arms stop
        # once their pairs are decided: the arms of a pair must run side by side to be compared
        # while they run (each at `threads` threads, sharing the cores).
        self.crowd = bool(max_parallel) or bool(plan.decide)
        fit = max(1, self.cpus // (self.tasks * max(threads, 1)))
        self.max_parallel = max_parallel or (max(fit, len(todo)) if plan.decide else fit)
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
        those whose failed. Each task runs `threads` threads (or, with 0, its job's equal share of
        the CPUs free among the jobs ready now)."""
        ready = sum(all(self.states.get(d) == RunState.COMPLETED for d in j.depends_on) for j in self.pending)
        for job in list(self.pending):
            free = self.cpus - sum(self.given.values())
            if len(self.running) >= self.max_parallel or (
                self.running and free < self.tasks and not self.crowd
            ):
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
                if self.threads:
                    share = self.threads * self.tasks
                else:
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
    if state.state in DONE:
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


def _stop_local(manifest: dict[str, Any], only: set[str]) -> int:
    """Stop a sweep that runs on this machine: its launcher first (without --arms), so that it
    starts nothing more, then each running job's trainer (SIGTERM: a checkpoint at its next step)."""
    targets = [] if only else [("the launcher", claimant(manifest["sweep_dir"]))]
    targets += [
        (name, claimant(job["run_dir"])) for name, job in manifest["jobs"].items() if not only or name in only
    ]
    stopped = 0
    for name, owner in targets:
        if owner is None:
            continue
        if owner.get("host") != socket.gethostname() or not owner.get("pid"):
            print(f"{name}: runs on {owner.get('host', '?')}, not here: stop it there", file=sys.stderr)
            continue
        try:
            os.kill(int(owner["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped += 1
        what = "" if name == "the launcher" else ": it checkpoints at its next step"
        print(f"stopping {name} (pid {owner['pid']}){what}")
    if stopped:
        print("resume with the sweep command: stopped jobs continue from their checkpoints")
    else:
        print("nothing to cancel")
    return 0
