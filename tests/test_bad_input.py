"""Bad input, tried as a new user would: each is refused with a one-line message naming the input,
through the real command line, before anything is queued or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

SWEEP = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", "arm=A,H"]

# (overrides, what the message must say)
SWEEP_CASES = [
    (["experiment.arms.H.lr_scale=-2"], "optimizer.lr=-0.00125: expected a positive lr"),
    (["experiment.arms.H.lr_scale=0"], "optimizer.lr=0.0: expected a positive lr"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0: expected a positive norm"),
    (["ops.base.weight_decay=-0.5"], "optimizer.weight_decay=-0.5: expected 0 or more"),
    (["ops.base.eps=0"], "optimizer.eps=0.0: expected a positive eps"),
    (["+trainer.chekpoint_every_tokens=8192"], "did you mean trainer.checkpoint_every_tokens"),
    (["trainer.chekpoint_every_tokens=8192"], "in trainer (did you mean trainer.checkpoint_every_tokens?)"),
    (["trainr.seq_len=64"], "trainr.seq_len: no such key (did you mean trainer.seq_len?)"),
    (["experiment.arms.H.rul=sqrt"], "in experiment.arms.H (did you mean experiment.arms.H.rule?)"),
    (
        ["experiment.token_budget=65536"],  # sqrt_rule's transient: 262144 tokens
        "arms A, H: a budget of 65536 tokens ends within the branch transient the analysis leaves out "
        "(experiment.skip_tokens=262144): no sample to compare; raise "
        "experiment.token_budget past 262144 or lower experiment.skip_tokens",
    ),
    (["experiment.ratio=3"], "4 / 3 is not a whole number"),
    (["experiment.ratio=8"], "4 / 8 is not a whole number"),
    (["experiment.ratio=0"], "4 / 0 is not a whole number"),
    (["trainer.log_every_steps=0"], "trainer.log_every_steps=0: expected at least 1"),
    (["trainer.val_samples=0"], "trainer.val_samples=0: expected at least one validation sequence"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0"),
    (["trainer.noise_scale_decay=1.5"], "trainer.noise_scale_decay=1.5"),
    (["trainer.attn_implementation=magic"], "trainer.attn_implementation='magic'"),
    (["trainer.micro_batch_size=-1"], "trainer.micro_batch_size=-1"),
    (["wandb.mode=sometimes"], "wandb.mode='sometimes'"),
    (["experiment.arms.H.optimizer=micro_adam", "precision=fp16"], "micro_adam does not support fp16"),
    (["trainer.per_example_stats=true", "trainer.loss_kernel=liger"], "set trainer.loss_kernel=fused"),
    (["trainer.per_example_unit=word"], "trainer.per_example_unit='word': expected sequence or token"),
    (
        ["+experiment.lr_ladders={x:[A,Z]}"],
        "experiment.lr_ladders.x: ['A', 'Z'] must name arms of the experiment",
    ),
    (["experiment.arms.H.optimizer=micro_adam_var"], "micro_adam_var estimates a per-sequence variance"),
    (["experiment.arms.H.optimizer=adam"], "optimizer.name='adam': expected one of adamw, invariant_adam"),
    (["precision=fp32", "experiment.arms.A.precision=fp8"], "precision='fp8'"),
    (["data.source=nope"], "data.source='nope'"),
    (["data.source=text_files", "data.path=/nowhere"], "data.path='/nowhere': not a directory"),
    (
        ["data.source=parquet", "data.path=/nowhere/*.parquet"],
        "data.path='/nowhere/*.parquet': no file matches",
    ),
    (["data.tokenizer.vocab_size=100"], "data.tokenizer.vocab_size=100: a byte-level BPE has at least 257"),
    (["model.vocab_size=1000"], "has 2048 tokens, more than model.vocab_size=1000"),
    (["ops.base.beta2=1.0"], "beta2=1.0, outside (0, 1)"),
    (["experiment.token_budget=1000"], "not a positive multiple"),
    (["trainer.seq_len=4096"], "exceeds model.max_position_embeddings"),
    (["sweep.dir="], "give a directory"),
    (["sweep.root="], "give a directory"),
    (["experiment.arms.H.rule=nope"], "rule 'nope' is not one of"),
    (["experiment.pairs=[[A,Z]]"], "experiment.pairs: ['A', 'Z'] must name two different arms"),
    (["experiment.yardstick=[[A,H]]"], "A (batch 4) and H (batch 1) are at different batch sizes"),
    (["experiment.yardstick=[[H,D]]"], "uses the control arm(s) D: a control must never set the margin"),
]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def _refused(out: subprocess.CompletedProcess[str], message: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-2000:]
    assert message in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert any(line.startswith("error:") for line in text.splitlines()), text[-2000:]


@pytest.mark.parametrize(("overrides", "message"), SWEEP_CASES, ids=[" ".join(c[0]) for c in SWEEP_CASES])
def test_bad_sweep_input_is_refused_before_anything_is_written(overrides, message, tmp_path):
    root = tmp_path / "root"
    out = _run([*SWEEP, f"sweep.root={root}", *overrides], tmp_path)
    _refused(out, message)
    assert not root.exists(), sorted(root.rglob("*"))  # nothing queued, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even in the working directory


# Local FineWeb-Edu shards and tokenizer (the `fineweb` fixture) with one thing wrong each.
LOCAL_DATA_CASES = [
    (["data.text_field=content"], "data.text_field='content' is not a column of"),
    (["model.vocab_size=512"], "has 1024 tokens, more than model.vocab_size=512"),
    (["data.splits.max_tokens=1000000000"], "data.splits.max_tokens=1000000000 but the 4 shards"),
    (["data.tokenizer.name={empty}"], "a directory without tokenizer.json"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), LOCAL_DATA_CASES, ids=[c[1][:30] for c in LOCAL_DATA_CASES]
)
def test_bad_local_data_is_refused_before_anything_is_written(overrides, message, fineweb, tmp_path):
    root, empty = tmp_path / "root", tmp_path / "empty"
    empty.mkdir()
    data = ["data=fineweb_edu", "data.source=parquet", f"data.path={fineweb.parquet}"]
    data += [f"data.tokenizer.name={fineweb.tokenizer}", "data.splits.max_tokens=100000"]
    extra = [o.format(empty=empty) for o in overrides]
    out = _run([*SWEEP, f"sweep.root={root}", *data, *extra], tmp_path)
    _refused(out, message)
    assert not root.exists()


def test_a_sweep_dir_that_is_a_file_or_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _refused(_run([*SWEEP, f"sweep.root={blocker}/x"], tmp_path), "is a file, not a directory")
    _refused(_run([*SWEEP, "sweep.root=/proc/bss"], tmp_path), "cannot create anything in /proc")


def test_an_arm_defined_twice_in_a_yaml_file(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "dup.yaml").write_text(
        "# @package _global_\nexperiment:\n  arms:\n    A: {op: base, rule: none, batch_size: 16}\n"
        "    A: {op: base, rule: none, batch_size: 4}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "+experiment=dup",
        "-m",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
    ]
    _refused(_run(cmd, tmp_path), "dup.yaml line 5: duplicate key 'A'")


def test_slurm_without_a_controller_writes_no_manifest(tmp_path):
    root = tmp_path / "root"
    out = _run(
        [*SWEEP, f"sweep.root={root}", "hydra/launcher=slurm"],
        tmp_path,
        PATH=str(Path(sys.executable).parent),
    )
    _refused(out, "no SLURM controller answers")
    assert not (root / "sqrt_rule" / "manifest.json").exists()


def _fake_sweep(root: Path) -> Path:
    sweep_dir = root / "sqrt_rule"
    run_dir = sweep_dir / "runs" / "A-x"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 128, "loss": 3.0}) + "\n")
    job = {
        "kind": "arm",
        "signature": "x",
        "run_dir": "runs/A-x",
        "derived": {"batch_size": 1},
        "job_ids": [],
    }
    arms = ["A", "H", "J", "B", "D"]
    manifest = {
        "experiment": "sqrt_rule",
        "pairs": [["A", "H"], ["J", "B"], ["A", "D"]],
        "arms": arms,
        "jobs": {"A": job},
    }
    (sweep_dir / "manifest.json").write_text(json.dumps(manifest))
    return sweep_dir


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["analysis.alpha=0.95"], "analysis.alpha=0.95: expected a level in (0, 0.5)"),
        (["analysis.bins=0"], "analysis.bins=0: expected at least 1"),
        (["analysis.segments=0"], "analysis.segments=0: expected at least 1"),
        (["analysis.skip_tokens=-5"], "analysis.skip_tokens=-5"),
        (["analysis.pairs=[[A,Z]]"], "unknown arm(s) Z; the sweep's arms: A, B, D, H, J"),
        (["analysis.yardstick=[[A,Z]]"], "unknown arm(s) Z; the sweep's arms: A, B, D, H, J"),
        (["analysis.yardstick=[[A,J,H]]"], "analysis.yardstick: ['A', 'J', 'H'] does not name two arms"),
        (["analysis.margin="], "analysis.margin: '' is not a number"),
        (["analysis.bins=many"], "analysis.bins: 'many' is not an integer"),
        (["analysis.margn=0.1"], "no such key in analysis (did you mean analysis.margin?)"),
    ],
)
def test_bad_analysis_input_is_refused_before_anything_is_written(overrides, message, tmp_path):
    sweep_dir = _fake_sweep(tmp_path)
    cmd = [sys.executable, "-m", "analysis", "+experiment=sqrt_rule", f"sweep.root={tmp_path}", *overrides]
    out = _run(cmd, tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (sweep_dir / "results").exists()


@pytest.mark.parametrize("tool", ["sweep.status", "sweep.resubmit", "sweep.cancel"])
def test_a_damaged_manifest_is_named_not_a_traceback(tool, tmp_path):
    sweep_dir = _fake_sweep(tmp_path)
    (sweep_dir / "manifest.json").write_text('{"jobs": {"A": ')  # damaged by something else
    out = _run([sys.executable, "-m", tool, "sqrt_rule", "--root", str(tmp_path)], tmp_path)
    assert out.returncode == 2 and "manifest.json is damaged" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_the_sweep_command_refuses_a_damaged_manifest_too(tmp_path):
    sweep_dir = _fake_sweep(tmp_path)
    (sweep_dir / "manifest.json").write_text("{")
    out = _run([*SWEEP, f"sweep.root={tmp_path}", "sweep.dry_run=false"], tmp_path)
    _refused(out, "manifest.json is damaged")
    assert (sweep_dir / "manifest.json").read_text() == "{"  # left as it was, for the user to restore


def test_the_tools_accept_an_experiment_name(tmp_path):
    _fake_sweep(tmp_path)
    for tool in ("sweep.status", "sweep.resubmit", "sweep.cancel"):
        out = _run([sys.executable, "-m", tool, "nosuch", "--root", str(tmp_path)], tmp_path)
        assert out.returncode == 2 and "holds no manifest.json" in out.stderr, (tool, out.stderr[-1000:])
    out = _run([sys.executable, "-m", "sweep.status", "sqrt_rule", "--root", str(tmp_path)], REPO)
    assert out.returncode in (0, 1) and "A" in out.stdout
