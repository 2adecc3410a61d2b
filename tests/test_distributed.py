"""Correct on a cluster before it runs there: the backend from which physical GPU each rank
holds (with the environment submitit exports), and no rank left behind: every rank waits for a
stop's checkpoint, and one rank's failure ends the others within seconds, its error recorded."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.harness import fault_worker, free_port, status, submitit_env, submitit_job_id, tiny_run

# What each rank of a 2-rank one-node job sees under three GPU bindings: (GPUs visible, the UUID
# of each visible GPU). Rank r holds visible GPU r % count.
LAYOUTS = {
    "one GPU per task (--gpus-per-task=1)": (1, lambda rank, i: f"GPU-{rank}"),
    "every GPU visible to every task": (2, lambda rank, i: f"GPU-{i}"),
    "two tasks on one GPU": (1, lambda rank, i: "GPU-0"),
}


def placement_worker(rank: int, world: int, job: str, layout: str, out: Path) -> None:
    """One rank's `init_distributed` under the submitit job environment, its CUDA device queries
    answered as `layout` binds GPUs; the process group it would make is recorded, not made (no
    NCCL here)."""
    import os

    import torch
    import torch.distributed as dist

    from slurm.environment import export_distributed_env
    from train import distributed

    os.environ.update(submitit_env(rank, world, job))
    export_distributed_env()
    count, uuid = LAYOUTS[layout]
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: count
    torch.cuda.set_device = lambda device: None
    torch.cuda.get_device_properties = lambda d: SimpleNamespace(uuid=uuid(rank, torch.device(d).index))
    made = {}
    dist.init_process_group = lambda backend, **kw: made.update(backend=backend, world=kw["world_size"])
    where = distributed.init_distributed()
    assert where.watch is not None
    time.sleep(where.watch.POLL_S * 1.5)  # the watches poll rank 0's store: it must stay up
    where.watch.close()
    record = dict(made, device=str(where.device), reason=where.reason, env=os.environ["LOCAL_WORLD_SIZE"])
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("layout", "backend", "devices"),
    [
        ("one GPU per task (--gpus-per-task=1)", "nccl", ["cuda:0", "cuda:0"]),
        ("every GPU visible to every task", "nccl", ["cuda:0", "cuda:1"]),
        ("two tasks on one GPU", "gloo", ["cuda:0", "cuda:0"]),
    ],
)
def test_the_backend_follows_which_physical_gpu_each_rank_holds(tmp_path, layout, backend, devices):
    import torch.multiprocessing as mp

    ctx, job = mp.get_context("spawn"), submitit_job_id()
    procs = [ctx.Process(target=placement_worker, args=(r, 2, job, layout, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["env"] for r in ranks] == ["2", "2"]  # submitit exported LOCAL_WORLD_SIZE=2 in every layout
    assert [r["backend"] for r in ranks] == [backend, backend]
    assert [r["device"] for r in ranks] == devices
    assert ranks[0]["reason"] == ranks[1]["reason"] and ranks[0]["reason"]


def test_backend_choice_names_its_reason():
    from train.distributed import RankFacts, choose_backend

    assert choose_backend([RankFacts("a", None), RankFacts("a", None)]) == ("gloo", "no rank holds a GPU")
    backend, reason = choose_backend([RankFacts("a", "GPU-1"), RankFacts("b", "GPU-1")])
    assert backend == "nccl" and "2 host(s)" in reason  # the same UUID on two hosts: two GPUs
    backend, reason = choose_backend([RankFacts("a", "GPU-1"), RankFacts("a", None)])
    assert backend == "gloo" and "rank(s) 1 hold no GPU" in reason


def _ranks(cfg, fault: str, out: Path):  # type: ignore[no-untyped-def]
    import torch.multiprocessing as mp

    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=fault_worker, args=(r, 2, port, cfg, out, fault)) for r in range(2)]
    for p in procs:
        p.start()
    return procs


def _faulty_run(prepared_data, tmp_path):  # type: ignore[no-untyped-def]
    return tiny_run(
        prepared_data,
        tmp_path / "run",
        token_budget=8 * 32 * 40,
        checkpoint_every_tokens=8 * 32 * 5,
        val_every_tokens=8 * 32 * 20,
    )


def test_every_rank_waits_until_the_stop_checkpoint_is_on_disk(prepared_data, tmp_path):
    """Rank 1 gets the stop signal; rank 0 takes 2 s to write the checkpoint. No rank may leave
    before it is on disk: a cluster that ends a job step when one task exits would kill the writer."""
    cfg = _faulty_run(prepared_data, tmp_path)
    procs = _ranks(cfg, "stop", tmp_path)
    for p in procs:
        p.join(timeout=120)
    assert status(Path(cfg.run_dir))["state"] == "stopped"
    markers = sorted((Path(cfg.run_dir) / "checkpoints").glob("*.sha256"))
    assert markers, "the stop wrote no checkpoint"
    on_disk = markers[-1].stat().st_mtime
    for rank in range(2):
        left = float((tmp_path / f"exit-{rank}").read_text())
        assert left >= on_disk, f"rank {rank} left before the checkpoint was on disk"


def _survivor(cfg, fault: str, out: Path, survivor: int) -> tuple[int | None, float, dict]:  # type: ignore[no-untyped-def]
    """Run both ranks with `fault`; the survivor's exit code (None: still running after 60 s),
    the seconds from the fault to its end, and the run's status. Every rank is killed after."""
    procs = _ranks(cfg, fault, out)
    try:
        procs[survivor].join(timeout=60)
        ended = time.time()
        return procs[survivor].exitcode, ended - float((out / "fault").read_text()), status(Path(cfg.run_dir))
    finally:
        for p in procs:
            p.kill()
            p.join()


@pytest.mark.parametrize(("fault", "survivor"), [("raise", 0), ("disk_full", 1)])
def test_a_failing_rank_ends_the_others_within_seconds_with_its_error_recorded(
    prepared_data, tmp_path, fault, survivor
):
    """The failing rank stays alive and out of every collective (as a dead NCCL peer looks to the
    others): the other rank must not wait for the backend's timeout (gloo: 30 min)."""
    cfg = _faulty_run(prepared_data, tmp_path)
    code, seconds, record = _survivor(cfg, fault, tmp_path, survivor)
    assert code is not None, "the other rank hung in a collective"
    assert code != 0
    assert seconds < 15
    failing = 1 - survivor
    assert record["state"] == "failed"
    expected = "RuntimeError: injected fault on rank 1" if fault == "raise" else "No space left on device"
    assert record["error"].startswith(f"rank {failing}: ") and expected in record["error"]
    assert record["distributed"]["backend"] == "gloo"


def test_a_rank_killed_outright_ends_the_run_as_failed_within_seconds(prepared_data, tmp_path):
    """Rank 1 dies by SIGKILL (the OOM killer) and reports nothing: rank 0's collective fails (gloo
    notices the closed connection; NCCL would not, and rank 1's store key never comes), rank 0
    records its own error and ends after waiting at most PeerWatch.RELEASE_WAIT_S for rank 1."""
    from train.distributed import PeerWatch

    code, seconds, record = _survivor(_faulty_run(prepared_data, tmp_path), "kill", tmp_path, 0)
    assert code not in (None, 0)
    assert seconds < PeerWatch.RELEASE_WAIT_S + 10
    assert record["state"] == "failed" and record["error"].startswith("rank 0: ")


def test_a_rank_killed_while_the_others_are_outside_any_collective_is_noticed(prepared_data, tmp_path):
    """Rank 0 is stuck writing a checkpoint (no collective would tell it anything, as under NCCL)
    when rank 1 is killed outright: its silence on the store ends the run, recorded as rank 1's."""
    code, seconds, record = _survivor(_faulty_run(prepared_data, tmp_path), "kill_quiet", tmp_path, 0)
    assert code not in (None, 0), "rank 0 never noticed"
    assert seconds < 3.0 + 10  # SILENT_S, set to 3 s
    assert record["state"] == "failed" and record["error"].startswith("rank 1: silent for 3 s")
