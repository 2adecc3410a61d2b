"""The model: a Qwen2-architecture decoder built from a written-out config, never from the hub,
wrapped so that its forward pass returns the summed next-token loss."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import transformers
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config, Qwen2ForCausalLM

from train.config import LOSS_KERNELS, ModelConfig
from train.fused_loss import fused_linear_cross_entropy, loss_and_logit_gradient
from train.unit_backward import UnitCollector


def qwen2_config(cfg: ModelConfig, attn_implementation: str = "sdpa") -> Qwen2Config:
    config = Qwen2Config(
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
    config._attn_implementation = attn_implementation
    return config


def build_model(cfg: ModelConfig, seed: int, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    """A freshly initialised model; the same (cfg, seed) gives the same weights on every rank.

    `attn_implementation`: `sdpa` (PyTorch's fused attention: flash / memory-efficient kernels on
    GPU), `eager`, or `flash_attention_2` where that package is installed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(qwen2_config(cfg, attn_implementation))
    base = rotary_base(model)
    if not math.isclose(base, cfg.rope_theta, rel_tol=1e-3):
        # transformers 4.x ignores `rope_parameters` and would train with its default base 10 000.
        raise RuntimeError(
            f"the built model's RoPE base is {base:.6g}, not model.rope_theta={cfg.rope_theta:.6g}: "
            f"transformers {transformers.__version__} did not take `rope_parameters` (needs 5.x)"
        )
    return model


def rotary_base(model: Qwen2ForCausalLM) -> float:
    """RoPE's base as the built model applies it: its frequencies are base^(-2k/d), k < d/2."""
    inv_freq = model.model.rotary_emb.inv_freq
    return float(inv_freq[1].double() ** (-len(inv_freq)))


def matmul_params(model: Qwen2ForCausalLM) -> int:
    """Parameters that take part in a matmul per token, counted on a built model: all of them but
    the input embedding table (a lookup), the LM head counted once whether or not it is tied to
    that table. `ModelConfig.matmul_params` gives the same from the shape (FLOPs and MFU use it)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
    return total if model.config.tie_word_embeddings else total - embedding


class TokenLoss(torch.nn.Module):
    """`forward(window)`: summed next-token cross-entropy over a (batch, seq_len + 1) window.

    Sums (not means) let accumulation and DDP average over tokens exactly as one large batch would.
    The loss lives inside `forward` so that DDP (and torch.compile) wrap the whole computation.

    `kernel` (`trainer.loss_kernel`) and `chunk_tokens` (`trainer.loss_chunk_tokens`) choose how
    the LM head and the loss run:
    - `chunked`: with `chunk_tokens` > 0 over that many tokens at a time, each chunk recomputed in
      backward, so only one chunk's logits are ever alive (full fp32 logits of 8 x 2048 tokens of
      a 152k vocabulary take 10 GB); with 0, the plain full loss.
    - `fused`: the same chunks, each head matmul done once, its gradients formed in the forward
      (train/fused_loss.py): no recompute.
    - `liger`: Liger-Kernel's fused linear cross-entropy (CUDA, where liger-kernel is installed).
    """

    def __init__(self, lm: Qwen2ForCausalLM, chunk_tokens: int = 0, kernel: str = "chunked") -> None:
        super().__init__()
        if kernel not in LOSS_KERNELS:
            raise ValueError(f"trainer.loss_kernel={kernel!r}: expected one of {', '.join(LOSS_KERNELS)}")
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.kernel = kernel
        self.liger = liger_loss() if kernel == "liger" else None
        self.masks = causal_without_mask(lm)
        self.elementwise = loss_and_logit_gradient  # the fused loss's softmax part
        self.head_loss = self._head_loss  # the chunked loss's chunk
        # Per-unit gradients (train/unit_backward.py), set where the run forms them: the LM head
        # is then told which rows of the flattened tokens each loss chunk holds.
        self.units: UnitCollector | None = None

    def compile_regions(self, backend: Any = "inductor") -> None:
        """`trainer.compile`: torch.compile each decoder layer in place, and the loss's
        memory-bound part (the fused kernel's softmax and its gradient, the chunked kernel's head
        + cross-entropy), as torchtitan compiles per block. The layers are alike, so one compiled
        graph serves them all (compile time of one layer, not of the model), and the attention
        masks are settled outside the compiled regions: SDPA keeps `is_causal=True` and grouped
        K/V heads, so flash attention runs (whole-model compile traced an explicit mask)."""
        for layer in self.lm.model.layers:
            layer.compile(backend=backend)
        self.elementwise = torch.compile(loss_and_logit_gradient, backend=backend)
        self.head_loss = torch.compile(self._head_loss, backend=backend)

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states, (tokens, hidden)."""
        hidden = self.lm.model(input_ids=inputs, attention_mask=self.masks).last_hidden_state
        return hidden.reshape(-1, hidden.size(-1))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        inputs, targets = window[:, :-1], window[:, 1:].reshape(-1)
        if self.kernel == "chunked" and self.chunk_tokens <= 0:
            logits = self.lm(input_ids=inputs, attention_mask=self.masks).logits
            return _cross_entropy_sum(logits.reshape(-1, logits.size(-1)), targets)
        hidden = self.hidden_states(inputs)
        units = self.units if self.units is not None and self.units.active else None
        if self.kernel == "fused":
            deliver = None
            if units is not None:  # the head's units are formed with its gradient, in the forward
                route = units.route_of(self.lm.lm_head)
                units.use(route)
                deliver = functools.partial(units.linear, route)
            return fused_linear_cross_entropy(
                hidden, self.lm.lm_head, targets, self.chunk_tokens, self.elementwise, deliver
            )
        if self.liger is not None:
            head = self.lm.lm_head
            return self.liger(head.weight, hidden, targets, head.bias).float()
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.size(0), self.chunk_tokens):
            rows = (hidden[i : i + self.chunk_tokens], targets[i : i + self.chunk_tokens])
            if units is None:
                part = checkpoint(self.head_loss, *rows, use_reentrant=False)
            else:  # the head runs eagerly anyway (a graph break): the plain chunk, told its rows
                part = checkpoint(self._head_loss, *rows, i, use_reentrant=False)
            total = total + part
        return total

    @torch.no_grad()
    def per_sequence(self, window: torch.Tensor) -> torch.Tensor:
        """The summed next-token loss of each sequence of `window`, in fp32 (evaluation only).

        The LM head runs over `chunk_tokens` tokens at a time when that is set, as in training."""
        inputs, targets = window[:, :-1], window[:, 1:].reshape(-1)
        hidden = self.hidden_states(inputs)
        chunk = self.chunk_tokens if self.chunk_tokens > 0 else hidden.size(0)
        losses = [
            torch.nn.functional.cross_entropy(
                self.lm.lm_head(hidden[i : i + chunk]).float(), targets[i : i + chunk], reduction="none"
            )
            for i in range(0, hidden.size(0), chunk)
        ]
        return torch.cat(losses).view(window.size(0), -1).sum(1)

    def _head_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, first_row: int | None = None
    ) -> torch.Tensor:
        """A chunk's summed loss; `first_row`: where the chunk starts in the flattened tokens,
        for the per-unit head (train/unit_backward.py), None for the plain one."""
        head = self.lm.lm_head
        logits = head(hidden) if first_row is None else head(hidden, first_row)
        return _cross_entropy_sum(logits, targets)


def causal_without_mask(lm: Qwen2ForCausalLM) -> dict[str, None] | None:
    """The attention masks to hand the decoder so that it builds none: every window is one
    unpadded causal sequence, so with SDPA no mask is the right mask (`is_causal=True`, K/V heads
    left grouped: `enable_gqa`). Left to itself, transformers inspects `position_ids` for packed
    sequences on every forward (a host read of a device value: a GPU sync), and under
    torch.compile it traces an explicit (B, 1, T, T) mask, which sends SDPA `is_causal=False` with
    K/V expanded to all heads: no flash attention. None (transformers builds its masks) for other
    attention kernels (eager attention adds the mask it is given: without one it would not be
    causal) and for sliding-window layers."""
    config = lm.config
    if config._attn_implementation != "sdpa" or set(config.layer_types or ()) != {"full_attention"}:
        return None
    return {"full_attention": None}


def liger_loss() -> torch.nn.Module:
    """Liger-Kernel's fused linear cross-entropy, summed over tokens; a clear error where it cannot run."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(
            "trainer.loss_kernel=liger needs the liger-kernel package (and CUDA): install it or "
            "use trainer.loss_kernel=fused"
        ) from exc
    loss: torch.nn.Module = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return loss


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
