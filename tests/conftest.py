"""Shared fixtures: a small local text corpus (no network) and Hydra composition of `conf/`."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WORDS = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "blood", "heart", "lord"]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small documents of seeded pseudo-English, one per file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(60)]
        (root / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "\n".join(lines))
    return root


@pytest.fixture(scope="session")
def prepared_data(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus tokenized (300-token BPE) into warmup / experiment / validation splits."""
    return prepare_texts(text_corpus, (0.25, 0.1, 0.65), tmp_path_factory.mktemp("cache"))


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


@pytest.fixture(scope="session")
def fineweb(tmp_path_factory: pytest.TempPathFactory):
    """3000 FineWeb-Edu-shaped documents as 4 parquet shards and as 4 jsonl shards, and a
    Qwen2-format tokenizer (1024 tokens) saved in a local directory."""
    from types import SimpleNamespace

    from tests.fineweb_files import documents, save_qwen2_tokenizer, write_shards

    root = tmp_path_factory.mktemp("fineweb")
    texts = documents(3000)
    return SimpleNamespace(
        texts=texts,
        parquet=write_shards(root / "parquet", texts),
        jsonl=write_shards(root / "jsonl", texts, fmt="jsonl"),
        tokenizer=str(save_qwen2_tokenizer(texts[:500], root / "qwen2-tokenizer")),
    )


# `python -m sweep` planning only: the arm table and plan.json, nothing run.
DRY_RUN = [sys.executable, "-m", "sweep", "+experiment=sqrt_rule", "-m", "sweep.dry_run=true"]


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


def compose(overrides: list[str]):
    """The typed Config `python -m sweep` would build for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweep.compose import to_config
    from sweep.schema import register

    register()

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def _slurm_up() -> str | None:
    """None if a SLURM controller answers here, else why not."""
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return "no SLURM client on this machine (slurm/cluster.sh up starts one)"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return f"no SLURM controller answers: {out.stderr.strip()} (slurm/cluster.sh up starts one)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip without a running cluster, unless SWEEP_REQUIRE_SLURM=1 (CI), where that is a failure."""
    import os

    why = _slurm_up()
    if why is None:
        return
    if os.environ.get("SWEEP_REQUIRE_SLURM") == "1":
        pytest.fail(f"SWEEP_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


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
