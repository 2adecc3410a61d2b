"""The fused linear cross-entropy (train/fused_loss.py) against the full loss: the loss and every
gradient, fp32 and bf16, tied and untied heads, chunks that do and do not divide the tokens, and
through the real trainer."""

from __future__ import annotations

import pytest
import torch

from tests.harness import rows, tiny_run
from train.config import ModelConfig
from train.fused_loss import fused_linear_cross_entropy
from train.model import TokenLoss, build_model

CFG = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)


def _loss_and_grads(
    tied: bool, kernel: str, chunk: int, dtype: torch.dtype | None, window: torch.Tensor
) -> tuple[float, list[torch.Tensor]]:
    cfg = ModelConfig(**CFG)
    cfg.tie_word_embeddings = tied
    lm = build_model(cfg, seed=0)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with autocast:
        loss = TokenLoss(lm, chunk, kernel)(window)
    (loss / 48).backward()
    return loss.item(), [p.grad.clone() for p in lm.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [0, 7, 16])  # all at once; 7 leaves a short last chunk of 48; 16 divides it
def test_fused_loss_and_gradients_equal_the_full_ones_in_fp32(tied, chunk):
    window = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    full, g_full = _loss_and_grads(tied, "chunked", 0, None, window)
    fused, g_fused = _loss_and_grads(tied, "fused", chunk, None, window)
    # fp32: the same products summed in another order (chunks, the softmax's form): rounding only
    assert fused == pytest.approx(full, rel=1e-6)
    for a, b in zip(g_fused, g_full, strict=True):
        assert _rel(a, b) <= 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_in_bf16_matches_the_chunked_one_and_the_fp32_loss_within_bf16_rounding(tied):
    window = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(1))
    reference, g_reference = _loss_and_grads(tied, "chunked", 0, None, window)
    chunked, g_chunked = _loss_and_grads(tied, "chunked", 7, torch.bfloat16, window)
    fused, g_fused = _loss_and_grads(tied, "fused", 7, torch.bfloat16, window)
    # The loss: the same bf16 matmuls as the recomputing chunked loss, the same fp32 sums.
    assert fused == pytest.approx(chunked, rel=1e-6)
    assert fused == pytest.approx(reference, rel=1e-3)  # bf16 logits of a ~6-nat loss
    # The gradients: the softmax's gradient is formed as exp(z - lse) - onehot here and by torch's
    # log-softmax backward there, both rounded to bf16 (2^-9 relative) before the matmuls, and
    # that rounding travels back through the layers. So both are held to the fp32 gradients: the
    # fused one as close as the chunked one, within a factor of 2 (measured 0.6-1.3 over seeds).
    fused_err = max(_rel(a, b) for a, b in zip(g_fused, g_reference, strict=True))
    chunked_err = max(_rel(a, b) for a, b in zip(g_chunked, g_reference, strict=True))
    assert fused_err <= 2 * chunked_err and fused_err <= 5e-2


def test_a_biased_head_and_inputs_without_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    full = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    expected = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    fused = fused_linear_cross_entropy(hidden, head, targets, chunk=5)
    got = torch.autograd.grad(fused, [hidden, head.weight, head.bias])
    assert fused.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(got, expected, strict=True):
        assert _rel(a, b) <= 1e-5
    head.requires_grad_(False)  # only the hidden states need a gradient: none is formed for W
    (grad,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, head, targets, 5), [hidden])
    assert _rel(grad, expected[0]) <= 1e-5


def test_the_trainer_with_the_fused_loss_logs_the_chunked_losses(prepared_data, tmp_path):
    """Twelve steps through `train(cfg)`: the fused and the recomputing chunked loss give the same
    logged losses and validation losses within fp32 rounding, which is why `loss_kernel` (fused or
    chunked) stays out of the run's identity."""
    from train.loop import train

    logged = {}
    for kernel in ("chunked", "fused"):
        run_dir = tmp_path / kernel
        train(tiny_run(prepared_data, run_dir, loss_kernel=kernel, loss_chunk_tokens=40, noise_probe_every=3))
        logged[kernel] = rows(run_dir) + rows(run_dir, "val_loss")
    assert len(logged["fused"]) == len(logged["chunked"]) == 14
    for a, b in zip(logged["fused"], logged["chunked"], strict=True):
        key = "loss" if "loss" in a else "val_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5)
