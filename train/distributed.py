"""Where a process runs among the ranks of a run, which backend the ranks talk over, and how one
rank's failure reaches the others.

`init_distributed()`:

1. rank, world and device from the standard torch variables (RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT; submitit exports them, see slurm/environment.py);
2. every rank publishes its host and the physical GPU it holds (UUID, else PCI address) on a
   TCPStore hosted by rank 0, before any process group exists;
3. NCCL when every rank holds a GPU and no two ranks of one host hold the same one; gloo when
   they share one (NCCL refuses two ranks on one GPU) or have none. Counts cannot decide this:
   on a cluster that binds one GPU per task (`--gpus-per-task=1`, `--gpu-bind`), every rank sees
   a single GPU while submitit exports LOCAL_WORLD_SIZE=8, and yet the 8 ranks hold 8 GPUs;
4. the process group is made on that same store, and a `PeerWatch` is started on it.

The choice and its reason are printed by rank 0 and recorded in status.json and the W&B config.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

RENDEZVOUS = timedelta(minutes=10)  # how long ranks wait for each other at start (slow nodes)


@dataclass(frozen=True)
class RankFacts:
    """What one rank tells the others before the process group exists."""

    host: str
    gpu: str | None  # the physical GPU it holds (None: it runs on the CPU)


def choose_backend(facts: list[RankFacts]) -> tuple[str, str]:
    """NCCL or gloo for these ranks, and why."""
    without = [r for r, f in enumerate(facts) if f.gpu is None]
    if without:
        if len(without) == len(facts):
            return "gloo", "no rank holds a GPU"
        return "gloo", f"rank(s) {_ranks(without)} hold no GPU while others do: every rank uses gloo"
    holder: dict[tuple[str, str | None], int] = {}
    for r, f in enumerate(facts):
        first = holder.setdefault((f.host, f.gpu), r)
        if first != r:
            return "gloo", (f"ranks {first} and {r} share GPU {f.gpu} on {f.host}, which NCCL refuses: gloo")
    hosts = len({f.host for f in facts})
    return "nccl", f"each of the {len(facts)} ranks holds its own GPU ({hosts} host(s))"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")


def local_device(local_rank: int, device_kind: str = "auto") -> tuple[torch.device, str | None]:
    """This process's device (a GPU per local rank where it sees GPUs, else the CPU) and the
    physical GPU behind it."""
    gpus = torch.cuda.device_count() if device_kind == "auto" and torch.cuda.is_available() else 0
    if not gpus:
        return torch.device("cpu"), None
    device = torch.device(f"cuda:{local_rank % gpus}")
    torch.cuda.set_device(device)
    return device, physical_gpu(device)


def physical_gpu(device: torch.device) -> str:
    """The GPU's UUID (the same whichever index CUDA_VISIBLE_DEVICES gives it), else its PCI
    address."""
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    domain, bus, slot = (getattr(props, f"pci_{k}_id") for k in ("domain", "bus", "device"))
    return f"pci:{domain:04x}:{bus:02x}:{slot:02x}"


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank among `world` processes, its device, and (with several
    ranks) the backend they talk over, why, and the watch that ends this rank when another fails."""

    rank: int
    world: int
    device: torch.device
    backend: str = ""
    reason: str = ""
    hosts: int = 1
    watch: PeerWatch | None = field(default=None, compare=False)

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def describe(self) -> dict[str, Any]:
        """For status.json and the W&B config."""
        return {
            "world": self.world,
            "hosts": self.hosts,
            "backend": self.backend or None,
            "reason": self.reason,
        }


def init_distributed(device_kind: str = "auto") -> Placement:
    """This process's placement; with several ranks, the process group and its peer watch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device, gpu = local_device(int(os.environ.get("LOCAL_RANK", "0")), device_kind)
    if world == 1:
        return Placement(rank, world, device)
    if dist.is_initialized():  # made by the caller (a test harness): its backend stands
        return Placement(rank, world, device, dist.get_backend(), "process group made by the caller")
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=RENDEZVOUS)
    facts = exchange(store, rank, world, RankFacts(socket.gethostname(), gpu))
    backend, reason = choose_backend(facts)
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world)
    hosts = len({f.host for f in facts})
    if rank == 0:
        print(f"distributed: {world} ranks on {hosts} host(s) over {backend}: {reason}", flush=True)
    return Placement(rank, world, device, backend, reason, hosts, PeerWatch(addr, port, rank, world, store))


def exchange(store: dist.Store, rank: int, world: int, mine: RankFacts) -> list[RankFacts]:
    """Every rank's facts, in rank order (each rank publishes its own, then waits for all)."""
    store.set(f"facts/{rank}", json.dumps(asdict(mine)))
    keys = [f"facts/{r}" for r in range(world)]
    store.wait(keys)
    return [RankFacts(**json.loads(store.get(k))) for k in keys]


class PeerWatch:
    """Ends this rank within seconds when another rank fails, instead of leaving it in a
    collective until the backend's timeout (NCCL's is 10 minutes, gloo's 30; a dead NCCL peer is
    not noticed before that).

    A failing rank records its error under one key of rank 0's store (`report`, first writer
    wins). A thread on every rank polls that key every `POLL_S`; on finding another rank's error,
    or rank 0's store gone (rank 0 died), it calls `on_failure` (rank 0: record the first error in
    status.json) and ends the process. A rank killed outright (SIGKILL, the OOM killer) reports
    nothing: every watch also counts a heartbeat on the store, and rank 0's records a rank whose
    count has not moved for `SILENT_S` as failed (NCCL would wait for its own timeout).

    Chosen over an error flag on the step's all-reduce, which cannot help a rank that fails
    outside a step (rank 0 while writing a checkpoint, with the others in the barrier after it),
    and over short collective timeouts, which a 6 GB checkpoint write would trip.

    At a normal end every rank `close`s its watch and says so on the store; rank 0 keeps the
    store up until every rank has, so that no watch mistakes the end of the run for a death.
    """

    POLL_S = 1.0
    # Rank 0 waits this long at most for the others to stop watching: they do within milliseconds
    # of it at every end but a rank's hard death (SIGKILL, OOM), which never says so.
    RELEASE_WAIT_S = 10.0
    # A rank whose watch thread has not counted a beat for this long is dead: the thread runs
    # beside whatever the main thread does (a 6 GB checkpoint write included).
    SILENT_S = 60.0
    FAILED, RELEASED, BEAT = "watch/failed", "watch/released", "watch/beat/{}"
    GONE = 1 << 40  # added to a rank's beat count when it stops watching: silent from then on

    def __init__(self, addr: str, port: int, rank: int, world: int, served: dist.Store) -> None:
        self.rank, self.world = rank, world
        self._served = served  # on rank 0 the store's server: it lives as long as the watch
        self.on_failure: Callable[[str], None] = lambda first: None
        self.handling = threading.Event()  # this rank is ending the run itself: the watch keeps out
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one client connection, used by the watch and the main thread
        self._store = dist.TCPStore(
            addr, port, is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False
        )
        self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        self._thread.start()

    def ending(self, error: str, failure: bool) -> str:
        """This rank is ending the run itself (the watch keeps out from now on): `failure` when
        it fails alone, not with every rank at one point (a stop, a divergence). Returns the error
        to record: on a failure, the first failing rank's."""
        self.handling.set()
        return self.report(error) if failure else error

    def report(self, error: str) -> str:
        """Record this rank's failure unless another rank's came first; returns the first one."""
        self.handling.set()
        mine = f"rank {self.rank}: {error}"
        try:
            with self._lock:
                return bytes(self._store.compare_set(self.FAILED, "", mine)).decode()
        except Exception:  # rank 0's store is gone: this rank's own error is all it knows
            return mine

    def _watch(self) -> None:
        beats: dict[int, tuple[int, float]] = {}  # rank 0: each rank's last count and when it moved
        while not self._stop.wait(self.POLL_S):
            try:
                with self._lock:
                    self._store.add(self.BEAT.format(self.rank), 1)
                    first = (
                        bytes(self._store.get(self.FAILED)).decode()
                        if self._store.check([self.FAILED])
                        else ""
                    )
                    if not first and self.rank == 0:
                        first = self._silent_rank(beats)
            except Exception as exc:
                first = f"rank 0 is gone (its store: {type(exc).__name__})"
            if not first:
                continue
            if self._stop.is_set() or self.handling.is_set():
                return
            self._end(first)

    def _silent_rank(self, beats: dict[int, tuple[int, float]]) -> str:
        """Rank 0: the first failure, once some rank's beat has not moved for SILENT_S (called
        with the lock held)."""
        now = time.monotonic()
        for rank in range(1, self.world):
            count = int(self._store.add(self.BEAT.format(rank), 0))
            if count >= self.GONE:
                continue
            if rank not in beats or beats[rank][0] != count:
                beats[rank] = (count, now)
            elif now - beats[rank][1] > self.SILENT_S:
                silent = f"rank {rank}: silent for {self.SILENT_S:.0f} s (killed? out of memory?)"
                return bytes(self._store.compare_set(self.FAILED, "", silent)).decode()
        return ""

    def _end(self, first: str) -> None:
        """Another rank failed: record it (`on_failure`) and end this process at once; the main
        thread may be inside a collective that would never return."""
        print(f"[rank {self.rank}] stopping because {first}", file=sys.stderr, flush=True)
        try:
            self.on_failure(first)
        finally:
            self._release()
            os._exit(1)

    def close(self) -> None:
        """Stop watching; on rank 0, keep the store up until every rank has stopped."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._release()
        if self.rank != 0:
            return
        for _ in range(int(self.RELEASE_WAIT_S / 0.05)):
            try:
                with self._lock:
                    if int(self._store.add(self.RELEASED, 0)) >= self.world:
                        return
            except Exception:
                return
            time.sleep(0.05)

    def _release(self) -> None:
        try:
            with self._lock:
                self._store.add(self.BEAT.format(self.rank), self.GONE)
                self._store.add(self.RELEASED, 1)
        except Exception:
            pass
