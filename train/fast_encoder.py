"""Byte-level BPE encoded with OpenAI's tiktoken where it gives the Hugging Face tokenizer's ids.

`tokenizers` encodes Qwen2.5's 151k vocabulary at ~0.25-0.30M tokens/s on one core here; tiktoken
encodes the same ranks at several times that (benchmarks/prepare_speed.py). A byte-level BPE
whose merges are applied in the order of the merged tokens' ids (what tiktoken does: the lowest
rank first) is the same function in both: Qwen's and GPT-2's are, having been made as tiktoken
ranks. `tiktoken_encoding` builds the tiktoken encoding from a `tokenizer.json` where the file is
of that kind (BPE model, byte-level pre-tokenizer with one split regex, no normalizer or NFC, no
byte fallback, merges in rank order) and None otherwise; `prepare` then checks it against the
Hugging Face tokenizer on `PROBES` before it uses it, and falls back to `tokenizers` on any
difference. tests/test_local_data.py compares the two id for id on a corpus and on these probes.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

# GPT-2's split regex: what ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text where two encoders that differ anywhere in splitting, merging, normalising or special
# tokens would likely disagree.
PROBES = [
    "Hello world, this is",
    "  leading spaces\t\ttabs\n\n\nnewlines \r\n crlf   trailing   ",
    "digits 1234567890 3.14159 1,000,000 12:30 2026-12-07 0x1F",
    "I'll we've they're it's SHE'S 'quoted' \"double\" — dash – en … ellipsis",
    "Ünïcödé: naïve café résumé Ångström 東京 北京 한국어 русский العربية हिन्दी",
    "combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ (NFC); ﬁ ligature; Ｆｕｌｌｗｉｄｔｈ",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷 zero\u200bwidth\u200djoiner",
    "special look-alikes: <|endoftext|> <|im_start|>user<|im_end|> <|endoftext <endoftext|> |>",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: print(f'{a!r}')",
    "url https://example.com/path?q=1&r=2#frag email a.b@c.de $100 €5 ¥3 ½ ²",
    "\x00\x01 control \x7f bytes\u00a0nbsp\u2028line sep",
    "a" * 300 + " " + "ab" * 150 + " " + "1" * 50,
]


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The one split regex of a byte-level pre-tokenizer, or None where it is of another kind."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    if len(steps) != 2:
        return None
    split, level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
        or level.get("type") != "ByteLevel"
        or level.get("use_regex")
        or level.get("add_prefix_space")
    ):
        return None
    return str(split["pattern"]["Regex"])


def tiktoken_encoding(tokenizer_json: str | Path) -> tuple[Any, Callable[[str], str]] | None:
    """(tiktoken Encoding, text normaliser) equal in construction to the tokenizer, or None."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(Path(tokenizer_json).read_text())
    model = spec.get("model") or {}
    normalizer = spec.get("normalizer")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or pattern is None:
        return None
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        return None
    decode = _byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in token): rank for token, rank in model["vocab"].items()}
    except KeyError:  # a token outside the byte-level alphabet
        return None
    if len(ranks) != len(model["vocab"]) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    # tiktoken merges the pair whose merged token has the lowest rank: the same as the merge
    # list's order only if the merged tokens' ids never fall along it (several merges may make one
    # token: the probes and tests/test_local_data.py check those ties).
    previous = -1
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = model["vocab"].get(left + right)
        if rank is None or rank < previous:
            return None
        previous = rank
    special = {
        t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"] not in model["vocab"]
    }
    encoding = tiktoken.Encoding(
        name=f"bss-{Path(tokenizer_json).parent.name}",
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens=special,
    )

    def normalise(text: str) -> str:
        return (
            text
            if normalizer is None or unicodedata.is_normalized("NFC", text)
            else unicodedata.normalize("NFC", text)
        )

    return encoding, normalise


def encoder(
    tokenizer_json: str | Path, check: bool = True, reference: Any = None
) -> Callable[[list[str]], list[list[int]]] | None:
    """A batch encoder by tiktoken for this tokenizer, if it gives the Hugging Face ids on
    `PROBES` (added tokens in the text are matched as `tokenizers` matches them; `check=False`:
    another process checked it; `reference`: the file as a `tokenizers.Tokenizer` already loaded);
    else None, and None where the environment says
    BSS_ENCODER=tokenizers (the slower path, never tiktoken)."""
    if os.environ.get("BSS_ENCODER") == "tokenizers":
        return None
    found = tiktoken_encoding(tokenizer_json)
    if found is None:
        return None
    encoding, normalise = found

    def encode(texts: list[str]) -> list[list[int]]:
        return [encoding.encode(normalise(t), allowed_special="all") for t in texts]

    if not check:
        return encode
    if reference is None:
        from tokenizers import Tokenizer

        reference = Tokenizer.from_file(str(tokenizer_json))
    expected = [e.ids for e in reference.encode_batch(PROBES, add_special_tokens=False)]
    return encode if encode(PROBES) == expected else None
