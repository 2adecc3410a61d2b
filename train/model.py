"""The model: a Qwen2-architecture decoder built from a written-out config, never from the hub."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from train.config import ModelConfig


def qwen2_config(cfg: ModelConfig) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        use_cache=False,
    )


def build_model(cfg: ModelConfig, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised model; the same (cfg, seed) gives the same weights on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(qwen2_config(cfg))


def token_loss_sum(model: torch.nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over a (batch, seq_len + 1) window, and the token count.

    Sums (not means) let accumulation and DDP average over tokens exactly as one large batch would.
    """
    inputs, targets = window[:, :-1], window[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
    )
    return loss, targets.numel()
