"""How fast does `prepare` tokenize FineWeb-Edu-shaped shards, and how does it scale? Run by hand:

    python -m benchmarks.prepare_speed                       # 20000 documents, 1 and 2 processes
    python -m benchmarks.prepare_speed --procs 1,2,4,8 --docs 80000

It writes parquet shards in FineWeb-Edu's schema (the tests' generator, tests/fineweb_files.py:
documents of ~1000 tokens) and a Qwen2-format fast tokenizer trained on them, then times the real
`train.data.prepare` end to end (datasets' streaming reader, tokenizing processes, hashing, the
dealing into splits, the writes) at each `data.num_proc`, and checks that every run wrote the same
split files. It also times the tokenizer alone on one core (the ceiling per process).
Goal: >= 1M tokens/s per core with the fast tokenizer, near-linear scaling.

The tokenizer is a stand-in (a byte-level BPE of a few thousand tokens on generated text), not
Qwen2.5's 151k-token one, which cannot be downloaded here: expect other absolute figures with it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tests.fineweb_files import documents, save_qwen2_tokenizer, write_shards
from train.config import DataConfig, SplitConfig, TokenizerConfig
from train.data import SPLITS, prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--words", type=int, default=700, help="mean words per document")
    parser.add_argument("--procs", default="1,2", help="data.num_proc values, comma-separated")
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    texts = documents(args.docs, mean_words=args.words)
    shards = write_shards(work / "shards", texts, shards=8)
    tokenizer = save_qwen2_tokenizer(texts[:2000], work / "tokenizer", vocab_size=args.vocab)
    base = DataConfig(
        source="parquet",
        path=shards,
        tokenizer=TokenizerConfig(kind="hf", name=str(tokenizer)),
        splits=SplitConfig(warmup=0.2, validation=0.05, experiment=0.75),
    )

    from tokenizers import Tokenizer

    alone = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    sample = texts[:2000]
    start = time.perf_counter()
    encode = getattr(alone, "encode_batch_fast", alone.encode_batch)  # as prepare's processes do
    count = sum(len(encode([t], add_special_tokens=False)[0].ids) for t in sample)
    ceiling = count / (time.perf_counter() - start)

    print(
        f"{args.docs} documents in 8 parquet shards, tokenizer of {alone.get_vocab_size()} tokens, "
        f"{len(os.sched_getaffinity(0))} CPUs"
    )
    print(f"tokenizer alone, one core: {ceiling / 1e6:.2f}M tokens/s")
    print(f"{'num_proc':>8} {'seconds':>8} {'tokens':>11} {'M tokens/s':>11} {'per proc':>9} {'speed-up':>9}")
    first_rate, reference = None, None
    for procs in [int(p) for p in args.procs.split(",")]:
        cfg = replace(base, num_proc=procs, cache_dir=str(work / f"cache-{procs}"))
        start = time.perf_counter()
        out = prepare(cfg, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(json.loads((out / "meta.json").read_text())["tokens"].values())
        bins = [(out / f"{s}.bin").read_bytes() for s in SPLITS]
        reference = reference or bins
        assert bins == reference, f"num_proc={procs} wrote other split files"
        rate = tokens / seconds
        first_rate = first_rate or rate
        print(
            f"{procs:>8} {seconds:>8.2f} {tokens:>11,} {rate / 1e6:>11.2f} {rate / procs / 1e6:>9.2f} "
            f"{rate / first_rate:>9.2f}"
        )
    print("split files identical at every num_proc")


if __name__ == "__main__":
    main()
