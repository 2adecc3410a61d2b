"""How a job's state is decided from its own status, the queue and accounting (pure logic).

The same resolver runs in `sweep.status` and in resubmission; the real-cluster tests exercise it
end to end without accounting, these cover every branch, with accounting answers included.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from sweep.job_states import resolve

NOW = 1_000_000.0


def running(heartbeat_age: float, **extra) -> dict:
    return {"state": "running", "heartbeat": NOW - heartbeat_age, **extra}


@pytest.mark.parametrize(
    ("status", "job_id", "queue", "accounting", "expected"),
    [
        ({"state": "completed"}, "7", {"7": "RUNNING"}, {}, "completed"),  # the run's word decides
        ({"state": "failed", "error": "boom"}, "7", {}, {"7": "COMPLETED"}, "failed"),  # SLURM said COMPLETED
        ({"state": "diverged"}, "7", {}, {}, "diverged"),
        (None, "7", {"7": "PENDING"}, {}, "pending"),
        (None, "7", {"7": "DEPENDENCY_NEVER_SATISFIED"}, {}, "failed"),
        (running(5), "7", {"7": "RUNNING"}, {}, "running"),
        (running(5), "7", {}, {"7": "TIMEOUT"}, "timeout"),
        (running(5), "7", {}, {"7": "CANCELLED by 0"}, "failed"),
        (running(5), "7", {}, {"7": "OUT_OF_MEMORY"}, "failed"),
        (running(3600), "7", {}, {}, "lost"),  # gone from the queue, no accounting, stale heartbeat
        (None, "7", {}, {}, "lost"),  # left the queue without ever starting
        ({"state": "stopped", "error": "stopped by SIGTERM"}, "7", {}, {}, "stopped"),
        ({"state": "requeued", "heartbeat": NOW - 5}, "7", {}, {}, "pending"),
        ({"state": "requeued", "heartbeat": NOW - 5}, "7", {"7": "PENDING"}, {}, "pending"),
        (None, None, {}, {}, "pending"),  # never submitted
        (None, None, None, {}, "pending"),
    ],
)
def test_resolve(status, job_id, queue, accounting, expected):
    assert resolve(status, job_id, queue, accounting, now=NOW).state == expected


def test_local_run_whose_process_is_gone_is_lost_at_once():
    here = socket.gethostname()
    gone = running(1, host=here, pid=2**22 + 12345)
    alive = running(1, host=here, pid=os.getpid())
    assert resolve(gone, None, None, {}, now=NOW).state == "lost"
    assert resolve(alive, None, None, {}, now=NOW).state == "running"
    assert resolve(running(1, host="elsewhere", pid=1), None, None, {}, now=NOW).state == "running"
    assert resolve({**alive, "heartbeat": time.time()}, None, None, {}).reason == ""
