"""Where a sweep's jobs run: one small interface with a backend per executor, as submitit splits
an Executor from its InfoWatcher. The sweep command, `sweep.resubmit` and `sweep.cancel` ask
`backend_for(name)` and never test the executor's name themselves.

- `queue()`: the scheduler's view of this user's jobs (None where there is none), which
  sweep/job_states.py combines with each run's own status;
- `submit(plan, todo, known, manifest)`: run or submit the jobs that need it; the states it knows;
- `cancel(manifest, only)`: stop the sweep's in-flight jobs (a checkpoint first where it can);
- `claim_wait_s`: how long a second sweep command waits for this one to let go of the sweep dir;
  `waits`: whether `submit` returns only when the jobs ended (then the tables can follow).
A job's requeue after SLURM's warning signal is the job's own (slurm/environment.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from records.run_status import RunState
from sweep.job_states import JobState
from sweep.plan import Job, SweepPlan

EXECUTORS = ("local", "slurm")


class Backend(Protocol):
    name: str
    claim_wait_s: float
    waits: bool

    def queue(self) -> dict[str, Any] | None: ...

    def submit(
        self, plan: SweepPlan, todo: list[Job], known: dict[str, JobState], manifest: dict[str, Any]
    ) -> dict[str, RunState]: ...

    def cancel(self, manifest: dict[str, Any], only: set[str]) -> int: ...


def backend_for(executor: str, max_parallel: int = 0, poll_s: float = 0.5, threads: int = 1) -> Backend:
    """The backend of `executor` (local | slurm); the local one's options for running side by side."""
    if executor == "local":
        from sweep.local_backend import LocalBackend

        return LocalBackend(max_parallel, poll_s, threads)
    if executor == "slurm":
        from sweep.slurm_backend import SlurmBackend

        return SlurmBackend()
    raise ValueError(f"unknown executor {executor!r} ({' | '.join(EXECUTORS)})")
