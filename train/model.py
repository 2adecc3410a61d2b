"""The model: a decoder-only causal LM of one of train/families.py's families, built from a
written-out config with the Auto classes (never from the hub), wrapped so that its forward pass
returns the summed next-token loss."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.checkpoint import checkpoint
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from records.metrics import GROUPS
from train.branch_point import weight_files
from train.config import LOSS_KERNELS, ModelConfig
from train.families import FAMILIES
from train.fused_loss import fused_linear_cross_entropy, loss_and_logit_gradient
from train.unit_backward import UnitCollector

# PyTorch's SDPA under a name of its own. Every window is one unpadded causal sequence, so no mask
# is the right mask (`is_causal=True`, K/V heads left grouped: `enable_gqa`), and transformers
# builds none for an attention kernel it has no mask function for. Left to itself it inspects
# `position_ids` for packed sequences on every forward (a host read of a device value: a GPU
# sync), and under torch.compile it traces an explicit (B, 1, T, T) mask, which sends SDPA
# `is_causal=False` with K/V expanded to all heads: no flash attention.
CAUSAL_SDPA = "causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def attention_kernel(config: PretrainedConfig, requested: str) -> str:
    """`trainer.attn_implementation` as the model is given it: SDPA without masks (CAUSAL_SDPA)
    where every layer attends to the whole causal past; the kernel asked for otherwise (eager
    attention adds the mask it is given: without one it would not be causal; sliding windows need
    their masks)."""
    windowed = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    layers = set(getattr(config, "layer_types", None) or {"full_attention"})
    return CAUSAL_SDPA if requested == "sdpa" and not windowed and layers == {"full_attention"} else requested


def hf_config(cfg: ModelConfig, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The transformers config of `cfg`'s family and shape (train/families.py), made locally."""
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    config = AutoConfig.for_model(cfg.arch, **cfg.hf_kwargs())
    config._attn_implementation = attention_kernel(config, attn_implementation)
    return config


def build_model(cfg: ModelConfig, seed: int, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised model; the same (cfg, seed) gives the same weights on every rank.

    `attn_implementation`: `sdpa` (PyTorch's fused attention: flash / memory-efficient kernels on
    GPU), `eager`, or `flash_attention_2` where that package is installed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(cfg, attn_implementation))
    if model.get_output_embeddings() is None:
        raise ValueError(f"model.arch={cfg.arch!r}: the built model has no LM head")
    base = rotary_base(model)
    if base is not None and not math.isclose(base, cfg.rope_theta, rel_tol=1e-3):
        # transformers 4.x ignores `rope_parameters` and would train with its default base 10 000.
        raise RuntimeError(
            f"the built model's RoPE base is {base:.6g}, not model.rope_theta={cfg.rope_theta:.6g}: "
            f"transformers {transformers.__version__} did not take `rope_parameters` (needs 5.x)"
        )
    return model


def load_pretrained(model: PreTrainedModel, directory: str) -> None:
    """The weights of a `save_pretrained` directory (safetensors, sharded or not) into `model`, in
    place. Every parameter and persistent buffer must be there, but those tied to one that is (a
    tied LM head, which save_pretrained writes once); a tensor of another shape or name is refused."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(directory)):
        weights.update(load_file(str(path)))
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ValueError(f"{directory}: weights the model does not have: {', '.join(unexpected[:5])}")
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{directory}: {name} is {tuple(tensor.shape)}, the model's {tuple(own[name].shape)}"
            )
    loaded = {own[n].data_ptr() for n in weights}
    missing = [n for n in own if n not in weights and own[n].data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{directory}: weights missing for {', '.join(missing[:5])}")
    model.load_state_dict(weights, strict=False)


def rotary_base(model: PreTrainedModel) -> float | None:
    """RoPE's base as the built model applies it: its frequencies are base^(-2k/d), k < d/2. None
    where the model has no default RoPE (learned positions; a scaled RoPE of its config.json)."""
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") != "default":
        return None
    inv_freq = rotary.inv_freq
    return float(inv_freq[1].double() ** (-len(inv_freq)))


def matmul_params(model: PreTrainedModel) -> int:
    """Parameters that take part in a matmul per token, counted on a built model by module type:
    all of them but the lookups (every Embedding: token and learned position tables), the LM head
    counted once whether or not it is tied to the token table. `ModelConfig.matmul_params` gives
    the same from the shape (FLOPs and MFU use it)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    lookups = {
        id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    head = model.get_output_embeddings()
    tied = any(id(p) in lookups for p in head.parameters())
    return total - sum(lookups.values()) + (sum(p.numel() for p in head.parameters()) if tied else 0)


def decoder_layers(lm: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder's repeated blocks (`layers` in most families, GPT-2's `h`): the ModuleList as
    long as the config's layer count."""
    count = lm.config.num_hidden_layers
    for module in lm.get_decoder().children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(lm).__name__}: no list of {count} decoder layers found")


def parameter_groups(model: torch.nn.Module) -> dict[int, str]:
    """The per-group statistics' group (records/metrics.py GROUPS) of every parameter of `model`
    (an LM, or a module wrapping one), by id, from the type of the module that holds it: lookups
    (token and position tables; a tied head's weight is the table's) are `embeddings`, the LM head
    `head`, any norm `norms` (OLMo2's q/k norms too), and a Linear (GPT-2's Conv1D) belongs to the
    nearest enclosing attention or MLP block. A parameter in none is refused, naming it."""
    lm = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    head = {id(p) for p in lm.get_output_embeddings().parameters()}
    modules = dict(model.named_modules())
    groups: dict[int, str] = {}
    for name, module in modules.items():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in groups:
                continue
            kind = type(module).__name__
            if isinstance(module, torch.nn.Embedding):
                groups[id(p)] = "embeddings"
            elif id(p) in head:
                groups[id(p)] = "head"
            elif isinstance(module, torch.nn.LayerNorm) or kind.endswith("Norm"):
                groups[id(p)] = "norms"
            else:
                parts = name.split(".")
                owners = [type(modules[".".join(parts[:k])]).__name__ for k in range(len(parts) - 1, 0, -1)]
                block = next((o for o in owners if "Attention" in o or "MLP" in o), None)
                if block is None:
                    raise ValueError(f"parameter {name}.{pname} ({kind}) is in no group of {GROUPS}")
                groups[id(p)] = "attention" if "Attention" in block else "mlp"
    return groups


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

    def __init__(self, lm: PreTrainedModel, chunk_tokens: int = 0, kernel: str = "chunked") -> None:
        super().__init__()
        if kernel not in LOSS_KERNELS:
            raise ValueError(f"trainer.loss_kernel={kernel!r}: expected one of {', '.join(LOSS_KERNELS)}")
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.kernel = kernel
        self.liger = liger_loss() if kernel == "liger" else None
        self.learned_positions = FAMILIES[lm.config.model_type].learned_positions
        self.elementwise = loss_and_logit_gradient  # the fused loss's softmax part
        self.head_loss = self._head_loss  # the chunked loss's chunk
        # Per-unit gradients (train/unit_backward.py), set where the run forms them: the LM head
        # is then told which rows of the flattened tokens each loss chunk holds.
        self.units: UnitCollector | None = None

    @property
    def decoder(self) -> torch.nn.Module:
        """The decoder stack, whatever the family names it (not a registered submodule: the
        parameters keep their one name under `lm`)."""
        decoder: torch.nn.Module = self.lm.get_decoder()
        return decoder

    @property
    def head(self) -> torch.nn.Linear:
        """The LM head (tied to the token table or not): a Linear in every family served."""
        head: torch.nn.Linear = self.lm.get_output_embeddings()
        return head

    def positions(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """`position_ids` of every sequence, for a family that looks them up in a learned table
        (GPT-2): transformers' default is one row broadcast over the batch, which would merge the
        table's per-sequence gradients (train/unit_backward.py). Empty for RoPE families."""
        if not self.learned_positions:
            return {}
        steps = torch.arange(inputs.shape[1], device=inputs.device)
        return {"position_ids": steps.expand(inputs.shape[0], -1)}

    def compile_regions(self, backend: Any = "inductor") -> None:
        """`trainer.compile`: torch.compile each decoder layer in place, and the loss's
        memory-bound part (the fused kernel's softmax and its gradient, the chunked kernel's head
        + cross-entropy), as torchtitan compiles per block. The layers are alike, so one compiled
        graph serves them all (compile time of one layer, not of the model). SDPA runs without
        masks (CAUSAL_SDPA), so it keeps `is_causal=True` and grouped K/V heads: flash attention."""
        for layer in decoder_layers(self.lm):
            layer.compile(backend=backend)
        self.elementwise = torch.compile(loss_and_logit_gradient, backend=backend)
        self.head_loss = torch.compile(self._head_loss, backend=backend)

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states, (tokens, hidden)."""
        hidden = self.decoder(input_ids=inputs, **self.positions(inputs))
        hidden = hidden.last_hidden_state
        return hidden.reshape(-1, hidden.size(-1))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        inputs, targets = window[:, :-1], window[:, 1:].reshape(-1)
        if self.kernel == "chunked" and self.chunk_tokens <= 0:
            logits = self.lm(input_ids=inputs, **self.positions(inputs)).logits
            return _cross_entropy_sum(logits.reshape(-1, logits.size(-1)), targets)
        hidden = self.hidden_states(inputs)
        units = self.units if self.units is not None and self.units.active else None
        if self.kernel == "fused":
            deliver = None
            if units is not None:  # the head's units are formed with its gradient, in the forward
                route = units.route_of(self.head)
                units.use(route)
                deliver = functools.partial(units.linear, route)
            return fused_linear_cross_entropy(
                hidden, self.head, targets, self.chunk_tokens, self.elementwise, deliver
            )
        if self.liger is not None:
            head = self.head
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
                self.head(hidden[i : i + chunk]).float(), targets[i : i + chunk], reduction="none"
            )
            for i in range(0, hidden.size(0), chunk)
        ]
        return torch.cat(losses).view(window.size(0), -1).sum(1)

    def _head_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, first_row: int | None = None
    ) -> torch.Tensor:
        """A chunk's summed loss; `first_row`: where the chunk starts in the flattened tokens,
        for the per-unit head (train/unit_backward.py), None for the plain one."""
        head = self.head
        logits = head(hidden) if first_row is None else head(hidden, first_row)
        return _cross_entropy_sum(logits, targets)


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
