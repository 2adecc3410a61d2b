"""What the tests (and the benchmarks, run as `python -m benchmarks.NAME` from the repository)
share: the repository's path, tiny runs and their data, Hydra composition of conf/, running a
run in its own process or as several DDP ranks, reading what runs logged, and simulated pairs of
arms with known truth. Fixtures stay in conftest.py; this module is imported like any other.

The W&B protocol stand-in and the FineWeb-Edu-shaped local files are their own modules beside
it: tests/wandb_standin.py, tests/fineweb_files.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from analysis.arms import Arm
    from train.config import RunConfig

REPO = Path(__file__).resolve().parent.parent

WORDS = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "blood", "heart", "lord"]


# `python -m sweep` planning only: the arm table and plan.json, nothing run.
DRY_RUN = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", "sweep.dry_run=true"]


TINY = [
    "experiment.token_budget=16384",
    "experiment.warmup.token_budget=8192",
    "trainer.val_every_tokens=8192",
    "experiment.warmup.lr_warmup_tokens=0",
    "experiment.skip_tokens=4096",  # sqrt_rule's declared transient (262144) is past this budget
    "trainer.noise_probe_every=8",  # B_noise measured often enough in 32-step arms
]

# 128 steps of the large batch after a short warmup; A-H about 0.1 nats apart and A-D about 0.25
# at this budget: a margin of 0.17 separates them (the demo's own margin needs its long budget).
STOPPING = [
    "experiment.token_budget=65536",
    "experiment.warmup.token_budget=8192",
    "experiment.warmup.lr_warmup_tokens=0",
    "experiment.skip_tokens=4096",
    "trainer.val_every_tokens=16384",
    "trainer.noise_probe_every=8",
    "arm=A,H,D",
    "experiment.stop_when_decided=true",
    "experiment.decide.margin=0.17",
    "experiment.decide.looks=4",
    "experiment.decide.segments=2",
    "experiment.decide.poll_s=0.2",
]


def prepare_texts(corpus: Path, shares: tuple[float, float, float], cache: Path) -> Path:
    """A directory of *.txt files tokenized (300-token BPE) into warmup / validation / experiment."""
    from train.config import DataConfig, SplitConfig, TokenizerConfig
    from train.data import prepare

    warmup, validation, experiment = shares
    cfg = DataConfig(
        source="text_files",
        path=str(corpus),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=300),
        splits=SplitConfig(warmup=warmup, validation=validation, experiment=experiment),
        cache_dir=str(cache),
    )
    return prepare(cfg, progress=False)


def tiny_run(data_dir: Path, run_dir: Path, **changes):
    """A RunConfig for a 2-layer, 32-wide model on `data_dir`: about 10 ms a step on one core.

    `changes` may name RunConfig fields and TrainerConfig fields alike (seq_len=..., grad_clip=...)."""
    from dataclasses import fields as dataclass_fields

    from train.config import ModelConfig, OptimizerConfig, RunConfig, TrainerConfig, WandbConfig

    fields = dict(
        name="arm",
        stage="arm",
        signature="test" + run_dir.name[-8:].replace("-", ""),
        run_dir=str(run_dir),
        data_dir=str(data_dir),
        model=ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
        optimizer=OptimizerConfig(lr=3e-3),
        batch_size=8,
        token_budget=8 * 32 * 12,
        wandb=WandbConfig(mode="disabled"),
    )
    trainer = {f.name for f in dataclass_fields(TrainerConfig)}
    fields["trainer"] = TrainerConfig(
        **{"seq_len": 32, **{k: changes.pop(k) for k in list(changes) if k in trainer}}
    )
    fields.update(changes)
    return RunConfig(**fields)


FAMILY_SHAPES = ["llama_tiny", "mistral_tiny", "olmo2_tiny", "gemma_tiny", "gpt2_tiny"]  # beyond Qwen2


def model_shape(name: str, **changes):
    """A conf/model/ shape as a ModelConfig, with `changes`."""
    import yaml

    from train.config import ModelConfig

    values = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**{**values, **changes})


def compose(overrides: list[str]):
    """The typed Config `python -m sweep` would build for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweep.compose import to_config
    from sweep.schema import register

    register()

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def sweep_status(sweep_dir: Path) -> tuple[int, dict[str, str]]:
    """Exit code of `python -m sweep.status` and the state it prints per job."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sweep.status", str(sweep_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = out.stdout.splitlines()
    header = lines[0]
    at = header.index("state")
    end = header.index(" ", at + len("state") + 1) + 1  # columns are padded to the header's
    end = len(header) - len(header[end:].lstrip())
    rows = [
        line for line in lines[2:] if line.strip() and " jobs: " not in line
    ]  # the table, not the summary
    return out.returncode, {line.split()[0]: line[at:end].strip() for line in rows}


# -- a run in its own process, as a job would run it ------------------------------------

RUN_SCRIPT = (
    "import json, sys; from train.config import RunConfig, from_dict; from train.loop import train; "
    "train(from_dict(RunConfig, json.load(open(sys.argv[1]))))"
)


def rows(run_dir: Path, key: str = "loss") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def start(cfg: RunConfig, **env: str) -> subprocess.Popen[str]:
    """`train(cfg)` in its own process, as a job would run it."""
    path = Path(cfg.run_dir).with_suffix(".json")
    path.write_text(json.dumps(asdict(cfg)))
    return subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, str(path)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen[str]) -> None:
    while proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"run ended before logging {n} steps: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]


def stop_after(cfg: RunConfig, n: int) -> None:
    """Start `cfg`, send SLURM's warning signal once it logged `n` rows; it must stop, checkpointed."""
    proc = start(cfg)
    wait_for_rows(Path(cfg.run_dir), n, proc)
    proc.send_signal(signal.SIGUSR2)
    code, err = finish(proc)
    assert code != 0 and "Stopped" in err


def trace(run_dir: Path) -> list[tuple]:
    """What must be bit-identical between an interrupted and an uninterrupted run."""
    train = [
        (r["step"], r["loss"], r["grad_norm"], r.get("b_simple"), r["clip_fraction"]) for r in rows(run_dir)
    ]
    return train + [(r["step"], r["val_loss"]) for r in rows(run_dir, "val_loss")]


# -- host reads: what would stall a GPU until its queue drains -------------------------------

# Tensor methods that hand a value to Python (each waits for the device on a GPU), and the
# constructors that copy Python data to a device.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextmanager
def counting_host_reads(on_host: Callable[[object], bool] = lambda t: False) -> Iterator[Counter[str]]:
    """Counts, while active, every Python-level read of a tensor's value to the host, every tensor
    made from Python data (`torch.tensor`, `new_tensor`, `as_tensor`: a copy to the device) and
    every blocking `.to(<another device>)`. On a CPU none of them costs anything, which is why they are
    counted rather than timed: each is a host-device sync where the step runs on a GPU. `on_host`
    names tensors that stay on the host on a GPU too (reading them is free): see `optimizer_steps`."""
    import torch

    counts: Counter[str] = Counter()

    def counted(name: str, fn: Callable) -> Callable:  # type: ignore[type-arg]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            if not (args and on_host(args[0])):
                counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def blocking_to(fn: Callable) -> Callable:  # type: ignore[type-arg]
        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            targets = [a for a in (*args, kwargs.get("device")) if isinstance(a, str | torch.device)]
            moves = any(torch.device(t).type != self.device.type for t in targets)
            if moves and not kwargs.get("non_blocking", False):
                counts["to(device)"] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    saved = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "new_tensor", "to")}
    makers = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    try:
        for name in (*HOST_READS, "new_tensor"):
            setattr(torch.Tensor, name, counted(name, saved[name]))
        torch.Tensor.to = blocking_to(saved["to"])  # type: ignore[method-assign]
        for name, fn in makers.items():
            setattr(torch, name, counted(f"torch.{name}", fn))
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in makers.items():
            setattr(torch, name, fn)


def optimizer_steps(optimizer: object) -> Callable[[object], bool]:
    """Whether a tensor is one of `optimizer`'s step counts: torch's Adam keeps them on the host
    (unless fused or capturable, and then reads none), so its `.item()` of them costs no sync."""

    def is_step(t: object) -> bool:
        return any(t is s.get("step") for s in optimizer.state.values())  # type: ignore[attr-defined]

    return is_step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_worker(rank: int, world: int, port: int, cfg: RunConfig, out: Path) -> None:
    """One rank: step-0 gradients through the trainer's own accumulation, then `train(cfg)`; what
    ends it with an exception is left in `<out>-error-<rank>.txt` for `run_world` to show."""
    try:
        _ddp_rank(rank, world, port, cfg, out)
    except BaseException:
        import traceback

        out.with_name(f"{out.stem}-error-{rank}.txt").write_text(traceback.format_exc())
        raise


def _ddp_rank(rank: int, world: int, port: int, cfg: RunConfig, out: Path) -> None:
    import torch
    import torch.distributed as dist

    import train.loop as loop
    from train.batching import plan_batches
    from train.data import TokenStream, load_split
    from train.loop import accumulate_gradients, train
    from train.model import TokenLoss, build_model

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    t = cfg.trainer
    plan = plan_batches(cfg.batch_size, t.micro_batch_size, world, t.seq_len, cfg.token_budget)
    stream = TokenStream(load_split(cfg.data_dir, cfg.split), t.seq_len, t.data_seed)
    lm = build_model(cfg.model, t.init_seed)
    net: torch.nn.Module = TokenLoss(lm)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    batch = torch.from_numpy(stream.rank_slice(0, cfg.batch_size, rank, world))
    accumulate_gradients(net, batch, plan, world > 1, lambda: torch.autocast("cpu", enabled=False))
    if rank == 0:
        torch.save({n: p.grad for n, p in lm.named_parameters()}, out)
    # Every step of `train(cfg)` counted for host reads (tests/test_step_syncs.py asserts none).
    reads: Counter[str] = Counter()

    def launch_counted(network, state, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not state.optimizer.state:  # the first step makes the optimizer's state: not counted
            return launch(network, state, *args, **kwargs)
        with counting_host_reads(optimizer_steps(state.optimizer)) as counts:
            queued = launch(network, state, *args, **kwargs)
        reads.update(counts)
        reads["steps"] += 1
        return queued

    launch, loop.launch_step = loop.launch_step, launch_counted
    train(cfg)
    out.with_name(f"{out.stem}-reads-{rank}.json").write_text(json.dumps(reads))
    if world > 1:
        dist.destroy_process_group()


def run_world(cfg: RunConfig, world: int, out: Path) -> None:
    """`ddp_worker` as `world` processes (gloo): the step-0 gradients of rank 0 saved to `out`."""
    import torch

    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, world, port, cfg, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    errors = [f.read_text()[-3000:] for f in sorted(out.parent.glob(f"{out.stem}-error-*.txt"))]
    assert [p.exitcode for p in procs] == [0] * world, "\n".join(errors)


def submitit_env(rank: int, world: int, job_id: str) -> dict[str, str]:
    """What SLURM gives task `rank` of a one-node job of `world` tasks, with the submitit job
    marker: `slurm.environment.export_distributed_env` turns it into the torch variables (the
    port from the job id, as submitit derives it: see `submitit_job_id`)."""
    return {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": job_id,
        "SLURM_NTASKS": str(world),
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
    }


def submitit_job_id() -> str:
    """A job id whose MASTER_PORT (submitit draws it from 20000-60000 seeded by the job id) is free."""
    import random

    for job in random.sample(range(1000, 1000000), 1000):
        port = random.Random(str(job)).randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port")


def fault_worker(rank: int, world: int, port: int, cfg: RunConfig, out: Path, fault: str) -> None:
    """One rank of `train(cfg)` with a fault injected (its time written to `out/fault`):

    - `stop`: rank 1 gets SLURM's warning signal at its 3rd step; rank 0's checkpoint writes
      take 2 s (each rank writes the time it left `train` to `out/exit-<rank>`);
    - `raise`: rank 1 raises at its 3rd step, then stays alive, as a rank whose peers cannot tell
      it failed (a dead NCCL peer);
    - `kill`: rank 1 is killed (SIGKILL, as by the OOM killer) at its 3rd step: it says nothing;
    - `kill_quiet`: rank 0's first checkpoint write hangs; rank 1, waiting for it, is killed
      outright: no collective of rank 0 can notice (as under NCCL), only the silence of rank 1;
    - `disk_full`: rank 0's first checkpoint write fails with ENOSPC, then rank 0 stays alive (as
      while it finishes its W&B run)."""
    import errno

    import torch

    import train.loop as loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    step, save = loop.launch_step, loop.save_checkpoint
    calls = [0]

    def faulty_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            (out / "fault").write_text(str(time.time()))
            if fault == "stop":
                os.kill(os.getpid(), signal.SIGUSR2)
            elif fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "raise":
                raise RuntimeError("injected fault on rank 1")
        return step(*args, **kwargs)

    def faulty_save(*args, **kwargs):  # type: ignore[no-untyped-def]
        if fault == "stop":
            time.sleep(2.0)
        elif fault == "kill_quiet":
            time.sleep(120)
        elif fault == "disk_full":
            (out / "fault").write_text(str(time.time()))
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return save(*args, **kwargs)

    loop.launch_step = faulty_step
    if rank == 0:
        loop.save_checkpoint = faulty_save
    if fault == "kill_quiet":
        import torch.distributed as dist

        from train.distributed import PeerWatch

        PeerWatch.SILENT_S = 3.0
        if rank == 1:

            def killed_at_barrier(*args, **kwargs):  # type: ignore[no-untyped-def]
                (out / "fault").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

            dist.barrier = killed_at_barrier
    try:
        loop.train(cfg)
    except Exception:
        if (fault, rank) in (("raise", 1), ("disk_full", 0)):
            time.sleep(120)  # alive, not in any collective
        raise
    finally:
        (out / f"exit-{rank}").write_text(str(time.time()))


# -- simulated pairs with a known truth (the verdict's calibration) -----------------------

SEQ = 128


def ar1(rng: np.random.Generator, n: int, rho: float, sd: float) -> np.ndarray:
    """A stationary AR(1) series with marginal standard deviation `sd`."""
    e = rng.standard_normal(n) * sd * math.sqrt(1 - rho**2)
    x = np.empty(n)
    x[0] = rng.standard_normal() * sd
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return x


def sim_arm(name: str, batch: int, loss: np.ndarray) -> Arm:
    """An arm whose step k (batch sequences of SEQ tokens) logged loss[k]."""
    from analysis.arms import Arm
    from analysis.paired import LoggedSteps

    steps = len(loss)
    tokens = (np.arange(steps) + 1) * batch * SEQ
    return Arm(
        name=name,
        base=name,
        variant="",
        replicate="",
        batch=batch,
        state="completed",
        tokens=int(tokens[-1]),
        steps=LoggedSteps.of(np.arange(1, steps + 1), tokens, loss),
        val_tokens=np.empty(0, dtype=np.int64),
        val_loss=np.empty(0),
    )


def simulated_pair(
    rng: np.random.Generator,
    gap: np.ndarray,
    rho: float,
    noise: float,
    ratio: int = 1,
    shared: float = 0.1,
    windows: int = 512,
) -> tuple[Arm, Arm]:
    """Arm a (batch 16) and arm b (batch 16 / ratio) over `windows` windows (512: the demo's 2^20
    tokens in steps of 16 x 128 tokens); a - b = `gap` per window
    plus each arm's own AR(1) noise of sd `noise` / sqrt(2) per step (so the paired gap per window
    has noise sd `noise` at ratio 1), plus `shared` sample noise common to both."""
    n_b = windows * ratio
    curve = 3.0 - np.linspace(0, 0.5, n_b)
    samples = rng.standard_normal(n_b) * shared * math.sqrt(ratio)  # per small step; averages to `shared`
    loss_b = curve + samples + ar1(rng, n_b, rho, noise / math.sqrt(2))
    window_samples = samples.reshape(windows, ratio).mean(1)
    loss_a = curve[ratio - 1 :: ratio] + window_samples + gap + ar1(rng, windows, rho, noise / math.sqrt(2))
    return sim_arm("a", 16, loss_a), sim_arm("b", 16 // ratio, loss_b)


def sequential_trial(
    rng: np.random.Generator,
    gap: float,
    delta: float,
    rho: float,
    noise: float,
    looks: int,
    windows: int = 512,
    segments: int = 4,
    equivalent_from: float = 0.0,
) -> tuple[tuple[str, int], tuple[str, int]]:
    """One simulated pair (equal batches: a window per step; paired gap `gap` plus AR(1) noise of
    sd `noise`) looked at `looks` times: (verdict, look it came at) of the sequential rule and of
    the naive rule that runs the fixed-budget test at every look. A pair still inconclusive at
    the last look reports that look."""
    from analysis.paired import Windows, in_range, segment_estimates
    from analysis.sequential import Looks, look_verdict
    from analysis.verdict import Verdict, verdict

    ends = (np.arange(windows) + 1) * 16 * SEQ
    w = Windows(ends - 16 * SEQ, ends, gap + ar1(rng, windows, rho, noise), np.zeros(windows))
    plan = Looks(looks, 0, int(ends[-1]), segments)
    out: dict[str, tuple[str, int]] = {}
    for k in range(1, looks + 1):
        if "sequential" not in out:
            found = look_verdict([w], delta, 0.05, plan, k)
            if found == "equivalent" and k / looks < equivalent_from:
                found = Verdict.INCONCLUSIVE  # too early to call a match (decide.equivalent_from)
            if found != "inconclusive" or k == looks:
                out["sequential"] = (str(found), k)
        if "naive" not in out:
            found = verdict(segment_estimates(in_range(w, 0, plan.tokens(k)), segments)[1], delta, 0.05)
            if found != "inconclusive" or k == looks:
                out["naive"] = (str(found), k)
    return out["sequential"], out["naive"]
