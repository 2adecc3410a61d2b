"""The decoder families the trainer serves, as data: how a written-out shape becomes a Hugging Face
config, how a `config.json` becomes a shape, and the parameter count of the matmuls per token.

Torch-free (the dry run on a login node estimates compute from the shape). `train/model.py` builds
the model with `AutoConfig.for_model(arch, **hf_kwargs(shape))` and the Auto classes, never from
the hub, and the tests hold `matmul_params` equal to the built model's count for every family.

What differs between families, and all that is read here:
- the names of the shape's keys (GPT-2: n_embd, n_layer, n_head, n_inner, n_positions);
- biases: Qwen2's q/k/v; Llama's, OLMo2's and Gemma's q/k/v/o where `attention_bias` is set and
  their MLP's where `mlp_bias` is (Llama); all of GPT-2's;
- the MLP: gated (gate, up, down: 3 d I) or plain (GPT-2: 2 d I);
- norms: RMSNorm (d weights) or LayerNorm (GPT-2: weight and bias), 2 per layer;
  OLMo2's q/k norms over the projected q and k;
- positions: RoPE, or a learned table (GPT-2's wpe: a lookup, like the token embeddings);
- head_dim: Gemma's is its own key (default 256 in transformers), elsewhere hidden / heads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The shape's fields (train.config.ModelConfig) in the HF configs of most families.
SHAPE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "initializer_range": "initializer_range",
}
# Keys of a config.json that describe the file, not the model.
METADATA_KEYS = (
    "architectures",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
)
# Dropout makes a step depend on how the batch is split over ranks and micro-batches (each draws
# its own masks): arms would no longer be paired observations.
DROPOUT_KEYS = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
)
NO_SPECIAL_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


@dataclass(frozen=True)
class Family:
    """What the shape, the FLOP count and the trainer need to know of one `model_type`."""

    keys: dict[str, str | None] = field(default_factory=lambda: dict(SHAPE_KEYS))  # None: not a key
    qkv_bias: bool | str = False  # True, False, or the config key that says
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    gated: bool = True
    layer_norm: bool = False  # LayerNorm (weight and bias), else RMSNorm (weight)
    norms_per_layer: int = 2
    qk_norm: bool = False
    rope: bool = True
    learned_positions: bool = False  # a position table the decoder looks up (GPT-2's wpe)
    head_dim_key: bool = False  # head_dim is a config key (always written out: HF defaults it to 256)
    defaults: dict[str, Any] = field(default_factory=dict)  # of config keys a config.json may leave out
    # keys a written-out shape sets: no special token ids (the token stream has no padding; a pad
    # id would make its embedding row untrainable, and transformers warns of ids past the vocabulary)
    written: dict[str, Any] = field(default_factory=lambda: dict(NO_SPECIAL_IDS))


_GPT2_KEYS: dict[str, str | None] = {
    **SHAPE_KEYS,
    "hidden_size": "n_embd",
    "intermediate_size": "n_inner",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "num_kv_heads": None,
    "max_position_embeddings": "n_positions",
    "rms_norm_eps": "layer_norm_epsilon",
}

FAMILIES: dict[str, Family] = {
    "qwen2": Family(qkv_bias=True, defaults={"rms_norm_eps": 1e-6}, written={}),
    "llama": Family(
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        mlp_bias="mlp_bias",
        defaults={"attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-6},
    ),
    "mistral": Family(defaults={"rms_norm_eps": 1e-6}, written={**NO_SPECIAL_IDS, "sliding_window": None}),
    "olmo2": Family(
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        qk_norm=True,
        defaults={"attention_bias": False, "rms_norm_eps": 1e-5},
    ),
    "gemma": Family(
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        head_dim_key=True,
        defaults={"attention_bias": False, "rms_norm_eps": 1e-6, "head_dim": 256},
    ),
    "gpt2": Family(
        keys=_GPT2_KEYS,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        gated=False,
        layer_norm=True,
        rope=False,
        learned_positions=True,
        defaults={"layer_norm_epsilon": 1e-5, "n_positions": 1024, "tie_word_embeddings": True},
        written={
            **NO_SPECIAL_IDS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
        },
    ),
}

# Model types that are not decoder-only causal LMs: named in the refusal, so the researcher learns
# why rather than that the name is unknown.
NOT_DECODERS = {
    "t5": "an encoder-decoder",
    "mt5": "an encoder-decoder",
    "bart": "an encoder-decoder",
    "mbart": "an encoder-decoder",
    "pegasus": "an encoder-decoder",
    "marian": "an encoder-decoder",
    "whisper": "an encoder-decoder",
    "bert": "an encoder without a causal LM head",
    "roberta": "an encoder without a causal LM head",
    "deberta": "an encoder without a causal LM head",
    "distilbert": "an encoder without a causal LM head",
    "electra": "an encoder without a causal LM head",
    "vit": "an image encoder without a causal LM head",
}


def family_problem(arch: str) -> str:
    """Why `arch` cannot be trained here ("" if it can)."""
    if arch in FAMILIES:
        return ""
    what = NOT_DECODERS.get(arch)
    if what:
        return (
            f"model.arch={arch!r} is {what}: this trainer trains decoder-only causal LMs "
            f"({', '.join(FAMILIES)})"
        )
    return f"model.arch={arch!r} is not a family this trainer serves ({', '.join(FAMILIES)})"


def family(arch: str) -> Family:
    problem = family_problem(arch)
    if problem:
        raise ValueError(problem)
    return FAMILIES[arch]


def _flag(f: Family, value: bool | str, options: dict[str, Any]) -> bool:
    return bool(options.get(value, f.defaults.get(value, False))) if isinstance(value, str) else value


def matmul_params(
    arch: str,
    vocab: int,
    hidden: int,
    inner: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_width: int,
    options: dict[str, Any],
) -> int:
    """Parameters that take part in a matmul per token: all but the lookups (token and learned
    position tables), the LM head counted once whether or not it is tied to the token table."""
    f = family(arch)
    d, q, kv = hidden, heads * head_width, kv_heads * head_width
    attention = d * q + 2 * d * kv + q * d
    if _flag(f, f.qkv_bias, options):
        attention += q + 2 * kv
    if _flag(f, f.o_bias, options):
        attention += d
    mlp = (3 if f.gated else 2) * d * inner
    if _flag(f, f.mlp_bias, options):
        mlp += (2 * inner if f.gated else inner) + d
    norm = 2 * d if f.layer_norm else d
    norms = f.norms_per_layer * norm + ((q + kv) if f.qk_norm else 0)
    return layers * (attention + mlp + norms) + norm + vocab * d


def hf_kwargs(arch: str, shape: dict[str, Any], head_width: int, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `AutoConfig.for_model(arch, ...)` for a shape (ModelConfig's
    fields by name) and the family's own `options` (model.options: any key of that family's HF
    config, written as transformers names it; a config.json's keys land there)."""
    f = family(arch)
    out: dict[str, Any] = {}
    for name, key in f.keys.items():
        if key is not None and name in shape:
            out[key] = shape[name]
    if f.rope:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    if f.head_dim_key or head_width != shape["hidden_size"] // shape["num_heads"]:
        out["head_dim"] = head_width
    out.update(f.written)
    out.update(options)
    out["use_cache"] = False
    return out


@dataclass(frozen=True)
class HfShape:
    """A config.json read as a shape: the ModelConfig fields, and every other model key."""

    arch: str
    fields: dict[str, Any]
    options: dict[str, Any]


def read_hf_config(directory: str) -> HfShape:
    """`model.hf_config`: a directory holding a `config.json` (what `save_pretrained` writes), read
    without transformers (a login node plans with it). Raises ValueError naming the problem."""
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"model.hf_config={directory!r}: no config.json in it")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.hf_config={directory!r}: config.json is not readable JSON ({exc})") from exc
    arch = str(raw.get("model_type", ""))
    if not arch:
        raise ValueError(f"model.hf_config={directory!r}: config.json names no model_type")
    f = family(arch)
    values = {**f.defaults, **raw}
    shape: dict[str, Any] = {}
    for name, key in f.keys.items():
        if key is not None and key in values:
            shape[name] = values[key]
    if arch == "gpt2":
        shape["num_kv_heads"] = shape["num_heads"]
        if shape.get("intermediate_size") is None:  # GPT-2's n_inner null: 4 d
            shape["intermediate_size"] = 4 * shape["hidden_size"]
    rope = values.get("rope_parameters") or {}
    if f.rope:
        theta = rope.get("rope_theta", values.get("rope_theta"))
        if theta is None:
            raise ValueError(f"model.hf_config={directory!r}: config.json gives no rope_theta")
        shape["rope_theta"] = float(theta)
    width = values.get("head_dim")
    if width and width != shape["hidden_size"] // shape["num_heads"]:
        shape["head_dim"] = int(width)
    used = {k for k in f.keys.values() if k is not None} | {"model_type", "head_dim", *METADATA_KEYS}
    if f.rope and rope.get("rope_type", "default") == "default" and set(rope) <= {"rope_type", "rope_theta"}:
        used |= {"rope_parameters", "rope_theta"}
    options = {k: v for k, v in raw.items() if k not in used}
    missing = [n for n in ("vocab_size", "hidden_size", "num_layers", "num_heads") if n not in shape]
    if missing:
        raise ValueError(f"model.hf_config={directory!r}: config.json gives no {', '.join(missing)}")
    return HfShape(arch, shape, options)


def model_problems(arch: str, options: dict[str, Any]) -> list[str]:
    """What the trainer cannot serve in a family's options (each a one-line message)."""
    problem = family_problem(arch)
    if problem:
        return [problem]
    problems = []
    values = {**FAMILIES[arch].written, **options}
    dropout = {k: values[k] for k in DROPOUT_KEYS if values.get(k)}
    if dropout:
        problems.append(
            f"model dropout {dropout}: set it to 0 (dropout masks depend on how a batch is split "
            "over ranks and micro-batches, so arms would stop being paired observations)"
        )
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if values.get(key):
            problems.append(
                f"model {key}={values[key]}: the trainer's loss heads apply no logit "
                "soft-capping; set it to null"
            )
    return problems
