"""The study on the researcher's own model and weights: every decoder family through the real
trainer (2 steps and more, exact resume after SIGKILL, 2-rank gloo DDP against one process), and
a sweep whose arms branch from a save_pretrained checkpoint or a finished run instead of a warmup.
The families' FLOP counts, loss heads and per-example statistics are in test_model.py and
test_per_example.py; their token files and tokenizers in test_local_data.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from records.manifest import read_manifest
from tests.harness import (
    FAMILY_SHAPES,
    REPO,
    TINY,
    model_shape,
    rows,
    run_world,
    start,
    sweep_status,
    tiny_run,
    trace,
    wait_for_rows,
)
from train.loop import train


def _first_step_gradients(cfg) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Step 0's gradients of `cfg` in this process, as one rank accumulates them."""
    from train.batching import plan_batches
    from train.data import TokenStream, load_split
    from train.loop import accumulate_gradients
    from train.model import TokenLoss, build_model

    t = cfg.trainer
    plan = plan_batches(cfg.batch_size, t.micro_batch_size, 1, t.seq_len, cfg.token_budget)
    stream = TokenStream(load_split(cfg.data_dir, cfg.split), t.seq_len, t.data_seed)
    lm = build_model(cfg.model, t.init_seed)
    batch = torch.from_numpy(stream.rank_slice(0, cfg.batch_size, 0, 1))
    accumulate_gradients(TokenLoss(lm), batch, plan, False, lambda: torch.autocast("cpu", enabled=False))
    return {n: p.grad for n, p in lm.named_parameters()}


def _sweep(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", f"sweep.root={root}", *TINY, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_every_family_trains_resumes_exactly_after_sigkill_and_ddp_matches_one_process(
    prepared_data, tmp_path, name
):
    """Each family through the real trainer: a run killed after step 2 and resumed logs the
    uninterrupted run bit for bit; 2-rank gloo DDP with accumulation gives its step-0 gradients
    and its losses."""
    kv = 2 if name.startswith("gpt2") else 1
    model = model_shape(
        name, vocab_size=320, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=kv
    )
    budget, every = 8 * 32 * 4, 8 * 32
    cfg = tiny_run(
        prepared_data, tmp_path / "one", model=model, token_budget=budget, checkpoint_every_tokens=every
    )
    train(cfg)  # the uninterrupted reference, in this process: no interpreter to start
    expected = trace(tmp_path / "one")
    killed = replace(cfg, run_dir=str(tmp_path / "killed"))
    proc = start(killed)
    wait_for_rows(tmp_path / "killed", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(killed)  # resumed in this process, from the killed one's newest checkpoint
    assert trace(tmp_path / "killed") == expected
    two = replace(cfg, run_dir=str(tmp_path / "g2"), trainer=replace(cfg.trainer, micro_batch_size=2))
    run_world(two, 2, tmp_path / "g2.pt")
    g1, g2 = _first_step_gradients(cfg), torch.load(tmp_path / "g2.pt")
    for param, grad in g1.items():
        assert (g2[param] - grad).norm() <= 1e-6 * grad.norm(), param
    assert [r["loss"] for r in rows(tmp_path / "g2")] == pytest.approx([e[1] for e in expected[:4]], abs=1e-5)


def _save_tiny_llama(directory: Path, seed: int) -> None:
    """A tiny Llama trained 3 AdamW steps on random tokens, saved as sharded safetensors."""
    import torch

    from tests.harness import model_shape
    from train.model import TokenLoss, build_model

    cfg = model_shape("llama_tiny", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    lm = build_model(cfg, seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    windows = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        TokenLoss(lm)(windows).backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.save_pretrained(directory, max_shard_size="200KB")
    (directory / "trainer_state.json").write_text(json.dumps({"num_input_tokens_seen": 1000 * (seed + 1)}))


@pytest.mark.e2e
def test_arms_branch_from_the_researchers_own_checkpoint(prepared_data, tmp_path):
    """experiment.branch_from: a tiny Llama saved with save_pretrained (sharded) is the start of a
    3-arm sqrt_rule sweep with no warmup; each arm's first validation loss is the saved model's on
    the same sequences; its signatures survive moving the directory and change with its weights;
    a model of another shape is refused naming the field."""
    import torch
    from transformers import AutoModelForCausalLM

    from sweep.plan import PlanError, build_plan
    from tests.harness import compose
    from train.data import load_split, validation_windows
    from train.model import TokenLoss

    ckpt = tmp_path / "ckpt"
    _save_tiny_llama(ckpt, seed=0)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1  # sharded, with its index
    data = f"data.cache_dir={tmp_path / 'data'}"
    given = [data, "model=llama_tiny", f"model.hf_config={ckpt}", f"experiment.branch_from={ckpt}"]
    out = _sweep(tmp_path / "sweeps", *given, "arm=A,H,B")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "sqrt_rule"
    code, states = sweep_status(sweep_dir)
    assert code == 0 and set(states) == {"prepare", "A", "H", "B"}, states  # no warmup
    manifest = read_manifest(sweep_dir)
    run = json.loads((Path(manifest["jobs"]["A"]["run_dir"]) / "status.json").read_text())
    lm = AutoModelForCausalLM.from_pretrained(ckpt)
    seq_len, samples = 128, 32  # the embedded study's trainer.seq_len and val_samples (defaults)
    windows = validation_windows(
        load_split(Path(manifest["jobs"]["prepare"]["run_dir"]), "validation"), seq_len, samples
    )
    with torch.no_grad():
        expected = TokenLoss(lm).per_sequence(torch.from_numpy(windows)).sum().item() / (samples * seq_len)
    for arm in ("A", "H", "B"):
        rows = [
            json.loads(x)
            for x in (Path(manifest["jobs"][arm]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        first = next(r for r in rows if "val_loss" in r)
        assert first["tokens"] == 0 and first["val_loss"] == pytest.approx(expected, abs=1e-6), arm
    assert manifest["jobs"]["A"]["derived"]["branch"].startswith("checkpoint:") and run

    def signatures(path: Path) -> dict[str, str]:
        jobs = [
            [
                data,
                "model=llama_tiny",
                f"model.hf_config={path}",
                f"experiment.branch_from={path}",
                *TINY,
                f"arm={a}",
            ]
            for a in "AHB"
        ]
        for j in jobs:
            j.insert(0, "+experiment=sqrt_rule")
        plan = build_plan([compose(j) for j in jobs], jobs)
        return {j.name: j.signature for j in plan.arms}

    before = signatures(ckpt)
    assert before == {a: manifest["jobs"][a]["signature"] for a in "AHB"}
    moved = tmp_path / "moved"
    ckpt.rename(moved)
    assert signatures(moved) == before
    _save_tiny_llama(moved, seed=1)  # other weights, same shape: other signatures
    assert set(signatures(moved).values()).isdisjoint(before.values())
    job = [
        "+experiment=sqrt_rule",
        data,
        "model=llama_tiny",
        f"experiment.branch_from={moved}",
        *TINY,
        "arm=A",
    ]
    with pytest.raises(PlanError, match=r"its config.json has hidden_size=32, the model hidden_size=64"):
        build_plan([compose(job)], [job])
    carry = [
        *job[:2],
        "model=llama_tiny",
        f"model.hf_config={moved}",
        *job[3:],
        "trainer.carry_optimizer=true",
    ]
    with pytest.raises(PlanError, match=r"holds no optimizer state"):
        build_plan([compose(carry)], [carry])
    # A finished run of this project is a branch point too, with its Adam moments; its content is
    # its final checkpoint's digest, its tokens the run's own.
    finished = tiny_run(prepared_data, tmp_path / "finished", token_budget=8 * 32 * 2)
    train(finished)
    own = ["+experiment=sqrt_rule", data, f"experiment.branch_from={finished.run_dir}", *TINY]
    own += ["trainer.carry_optimizer=true", "arm=A"]
    plan = build_plan([compose(own)], [own])
    (arm,) = plan.arms
    digest = sorted((tmp_path / "finished" / "checkpoints").glob("*.pt.sha256"))[-1].read_text().strip()
    assert arm.stage.run is not None and arm.stage.run.init_checkpoint == finished.run_dir
    assert arm.stage.run.trainer.carry_optimizer and [j.kind for j in plan.jobs] == ["prepare", "arm"]
    assert arm.row["branch"] == f"checkpoint:{digest[:16]}" and arm.row["branch_tokens"] == 8 * 32 * 2
