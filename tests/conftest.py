"""Shared fixtures: a small local text corpus (no network), its tokenized splits, FineWeb-Edu-shaped
local files, and the SLURM cluster the `slurm` tests need. Helpers are in tests/harness.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.harness import WORDS, prepare_texts


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
