"""The model wrapper: chunked loss equals the plain one; FLOP counting on the published shape."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import Qwen2ForCausalLM

from tests.conftest import REPO
from train.config import ModelConfig
from train.model import TokenLoss, build_model, flops_per_token, matmul_params, qwen2_config


def test_chunked_loss_and_gradients_equal_the_full_ones():
    cfg = ModelConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    window = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 7):  # 7 does not divide the 48 tokens: the last chunk is short
        lm = build_model(cfg, seed=0)
        loss = TokenLoss(lm, chunk)(window)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lm.parameters()]))
    (full, g_full), (chunked, g_chunked) = results
    # Summing 48 token losses in chunks instead of at once: fp32 rounding only.
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(g_full, g_chunked, strict=True):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-12


def test_per_sequence_losses_add_up_to_the_batch_loss():
    cfg = ModelConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    window = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(1))
    lm = build_model(cfg, seed=0)
    for chunk in (0, 7):
        per_sequence = TokenLoss(lm, chunk).per_sequence(window)
        assert per_sequence.shape == (3,)
        assert per_sequence.sum().item() == pytest.approx(TokenLoss(lm, 0)(window).item(), rel=1e-6)
        # each sequence alone gives its own entry
        assert TokenLoss(lm, chunk)(window[1:2]).item() == pytest.approx(per_sequence[1].item(), rel=1e-6)


def test_flops_per_token_on_qwen2_5_0_5b():
    values = yaml.safe_load((REPO / "conf" / "model" / "qwen2_5_0_5b.yaml").read_text())
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(qwen2_config(ModelConfig(**values)))
    # The published parameter count of Qwen2.5-0.5B (tied embeddings: the head is the table).
    assert matmul_params(lm) == 494_032_768
    assert flops_per_token(lm, 2048) == 6 * 494_032_768 + 12 * 24 * 896 * 2048


def test_untied_head_counts_once_and_the_lookup_not_at_all():
    cfg = ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    cfg.tie_word_embeddings = False
    lm = build_model(cfg, seed=0)
    total = sum(p.numel() for p in lm.parameters())
    assert matmul_params(lm) == total - 100 * 16
