"""Per-unit gradient moments of one step: the sums the per-example statistics and the optimizer
variants of train/adam_variants.py need, and their one reduction over ranks.

A *unit* is what one gradient g_u is the mean-token gradient of: a sequence (per-example
statistics, Roulet & Agarwala 2025, arXiv:2510.00236) or a micro-batch (batch-size-invariant
Adam, Wang & Aitchison 2024). Over the U units of the global batch, the step keeps

    sum_u g_u            -> the mean gradient mu_hat (what every optimizer steps with)
    sum_u g_u^2          -> M = mean_u g_u^2, elementwise (the second-moment input of MicroAdam)
    sum_u sign(g_u)      -> the mean of per-unit signs (signSGD with the sign first)
    sum_u |g_u|, |g_u|^2 and |g_u,k|^2 per parameter group k (the statistics below)

How a unit's gradient is obtained:
- one unit per micro-batch (invariant Adam; per-example statistics at micro_batch_size 1): the
  micro-batch's own backward, moved out of `.grad` after it (no extra compute);
- several sequences per micro-batch: per-example gradients inside the micro-batch with
  `torch.func.vmap(grad(functional_call))`, `trainer.per_example_chunk` sequences at a time (each
  chunk materialises one gradient per sequence). This replaces the micro-batch's backward: the
  mean of the per-example gradients is the micro-batch gradient.

Either way nothing syncs through DDP's reducer: `finish` all-reduces the sums in one flat buffer.

The statistics (all with the unbiased estimators of McCandlish et al. 2018, App. A, written for
U per-unit gradients instead of two batch sizes):

    tr(Sigma)  = U / (U - 1) * (mean_u |g_u|^2 - |mu_hat|^2)     per-unit noise (trace of covariance)
    |G|^2      = |mu_hat|^2 - tr(Sigma) / U                       the true gradient's squared norm
    B_simple   = tr(Sigma) / |G|^2                                in units (sequences)
    SNR_k      = |G_k|^2 / tr(Sigma_k)                            per parameter group k, per unit

SNR_k is the per-example signal-to-noise ratio of group k; a batch of B sequences has B x SNR_k.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.func import functional_call, grad_and_value, vmap

# Parameter groups of a Qwen2 decoder for the per-group SNR. With tied embeddings the LM head's
# gradient is part of the embedding table's, so `head` is empty and `embeddings` holds both.
GROUPS = ("embeddings", "attention", "mlp", "norms", "head")


def param_group(name: str) -> str:
    """The group of a parameter of `Qwen2ForCausalLM` (or of a module wrapping it) by its name."""
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    raise ValueError(f"parameter {name} is in no group of {GROUPS}")


@dataclass
class Moments:
    """One step's per-unit moments over every rank, as the optimizer and the statistics take them."""

    units: int  # U: units in the global batch
    mean_sq: list[torch.Tensor] | None  # per parameter: mean_u g_u^2 (None: not kept)
    mean_sign: list[torch.Tensor] | None  # per parameter: mean_u sign(g_u) (None: not kept)
    # The norm sums, still on the device (None where `UnitGradients` was told to skip them), in
    # float64: [sum_u |g_u|, sum_u |g_u|^2, sum_u |g_u,k|^2 per group k, |mu_hat_k|^2 per group k].
    # The trainer reads them with the rest of the step's figures, one step later (no host sync).
    sums: torch.Tensor | None = None
    groups: list[str] = field(default_factory=list)

    def statistics(self, sums: list[float] | None = None) -> dict[str, float]:
        """The logged statistics (see the module docstring) from `sums` (the norm sums as read to
        the host; default: read them now); empty with a single unit or without the norm sums."""
        u, k = self.units, len(self.groups)
        if u < 2 or self.sums is None:
            return {}
        values = self.sums.tolist() if sums is None else sums
        norm_sum, norm_sq_sum = values[0], values[1]
        group_sq_sum, group_mean_sq = values[2 : 2 + k], values[2 + k : 2 + 2 * k]
        mean_sq = sum(group_mean_sq)
        trace = u / (u - 1) * (norm_sq_sum / u - mean_sq)
        signal = mean_sq - trace / u
        norm_mean = norm_sum / u
        out = {
            "pe_norm_mean": norm_mean,
            "pe_norm_std": max(norm_sq_sum / u - norm_mean**2, 0.0) ** 0.5,
            "grad_sq_exact": signal,
            "noise_trace_exact": trace,
        }
        if signal > 0:
            out["b_simple_exact"] = trace / signal
        for group, group_sq, group_mean in zip(self.groups, group_sq_sum, group_mean_sq, strict=True):
            group_trace = u / (u - 1) * (group_sq / u - group_mean)
            if group_trace > 0:
                out[f"snr_{group}"] = (group_mean - group_trace / u) / group_trace
        return out


class UnitGradients:
    """Accumulates the per-unit sums of one step (see the module docstring) for `params`, named
    `names` (for their groups); `squares` and `signs` say which elementwise sums to keep, `norms`
    whether to keep the norm sums the statistics need (invariant Adam's step does not: skipping
    them spares every micro-batch a norm pass).

    The sums live in one flat buffer, allocated once and zeroed each step: the all-reduce over
    ranks takes it whole (no gather into a temporary), and no step allocates model-sized tensors.
    Nothing here reads a value to the host."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        names: list[str],
        squares: bool,
        signs: bool,
        norms: bool = True,
    ) -> None:
        self.params = params
        self.squares, self.signs, self.keep_norms = squares, signs, norms
        groups = [param_group(n) for n in names]
        self.groups = [k for k in GROUPS if k in groups]
        device = params[0].device
        self.group_of = torch.tensor([self.groups.index(k) for k in groups], device=device)
        self.units = 0
        parts = 1 + squares + signs
        size = sum(p.numel() for p in params)
        self.flat = torch.zeros(parts * size, device=device, dtype=params[0].dtype)
        views, offset = [], 0
        for _ in range(parts):
            for p in params:
                views.append(self.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        n = len(params)
        self.sum = views[:n]
        self.sq = views[n : 2 * n] if squares else []
        self.sign = views[(1 + squares) * n :] if signs else []
        # [sum_u |g_u|, sum_u |g_u|^2, sum_u |g_u,k|^2 for each group k], in float64: the spread
        # of the norms is a difference of two sums (mean |g|^2 - (mean |g|)^2) that cancels.
        self.norms = torch.zeros(2 + len(self.groups), device=device, dtype=torch.float64)
        self._present: dict[tuple[int, ...], torch.Tensor] = {}  # device index of params with a gradient

    def begin(self) -> None:
        self.flat.zero_()
        self.norms.zero_()
        self.units = 0
        for p in self.params:
            p.grad = None

    def add(self, grads: list[torch.Tensor]) -> None:
        """Add n units: `grads[i]` is (n, *shape of params[i]), each row a unit's mean gradient."""
        torch._foreach_add_(self.sum, [g.sum(0) for g in grads])
        if self.squares:
            torch._foreach_add_(self.sq, [(g * g).sum(0) for g in grads])
        if self.signs:
            torch._foreach_add_(self.sign, [g.sign().sum(0) for g in grads])
        self.units += grads[0].shape[0]
        if self.keep_norms:
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
            self._add_norms(norms.double().square())

    def add_grads(self, factor: float) -> None:
        """Add one unit from `.grad`, which holds the unit's mean gradient divided by `factor`, and
        clear `.grad` for the next micro-batch's backward (foreach ops: one unit per micro-batch
        must not cost a Python loop per parameter)."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]  # all of them: the filter is for mypy
        sums = [s for s, p in zip(self.sum, self.params, strict=True) if p.grad is not None]
        torch._foreach_add_(sums, grads, alpha=factor)
        if self.squares:
            sq = [s for s, p in zip(self.sq, self.params, strict=True) if p.grad is not None]
            torch._foreach_addcmul_(sq, grads, grads, value=factor**2)
        if self.signs:
            sign = [s for s, p in zip(self.sign, self.params, strict=True) if p.grad is not None]
            torch._foreach_add_(sign, torch._foreach_sign(grads))
        self.units += 1
        if self.keep_norms:
            norms = torch.zeros(len(self.params), device=self.group_of.device, dtype=torch.float64)
            present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
            if present not in self._present:  # made once: a Python list as an index is a host copy
                self._present[present] = torch.tensor(present, device=norms.device, dtype=torch.long)
            squares = torch.stack(torch._foreach_norm(grads)).double().square() * factor**2
            norms.index_copy_(0, self._present[present], squares)
            self._add_norms(norms[:, None])
        for p in params:
            p.grad = None

    def _add_norms(self, per_param: torch.Tensor) -> None:
        """`per_param`: (params, n) squared norms of n units' gradients, parameter by parameter."""
        n = per_param.shape[1]
        per_group = torch.zeros(len(self.groups), n, device=per_param.device, dtype=torch.float64)
        per_group.index_add_(0, self.group_of, per_param)
        total = per_group.sum(0)
        self.norms += torch.cat([total.sqrt().sum()[None], total.sum()[None], per_group.sum(1)])

    def finish(self, world: int) -> tuple[Moments, torch.Tensor]:
        """Set `.grad` to the mean gradient over every unit of every rank and return the moments,
        plus this rank's squared norm of its own mean gradient (the small-batch half of the
        two-batch noise estimate, taken before the reduction)."""
        local_units = self.units
        # |sum / n|^2 from the sums' norms: no copy of the gradients
        local_sq = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.sum)).float()) ** 2
        local_sq /= local_units**2
        if world > 1:
            dist.all_reduce(self.flat)
            if self.keep_norms:
                dist.all_reduce(self.norms)  # a few float64 scalars (see __init__)
        units = local_units * world
        self.flat.div_(float(units))  # sums -> means, in place
        for p, mean in zip(self.params, self.sum, strict=True):
            p.grad = mean
        moments = Moments(
            units=units,
            mean_sq=self.sq if self.squares else None,
            mean_sign=self.sign if self.signs else None,
        )
        if self.keep_norms:
            norms = torch.stack(torch._foreach_norm(self.sum)).double() ** 2
            group_mean = torch.zeros(len(self.groups), device=norms.device, dtype=torch.float64)
            group_mean.index_add_(0, self.group_of, norms)
            moments.sums, moments.groups = torch.cat([self.norms, group_mean]), self.groups
        return moments, local_sq


def per_example_gradients(
    module: torch.nn.Module, names: list[str], seq_len: int
) -> Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]:
    """A function of a (n, seq_len + 1) window returning each sequence's mean-token gradient of
    `module` (a `TokenLoss`) for the parameters `names`, stacked (n, ...) per parameter, and each
    sequence's summed token loss: `vmap` of `grad` over `functional_call`, on the module's own
    (detached) weights, so no `.grad` is touched. Tied weights are passed once (as
    `named_parameters` lists them) and `functional_call` ties them again."""

    def sequence_loss(params: dict[str, torch.Tensor], window: torch.Tensor) -> torch.Tensor:
        return functional_call(module, params, (window[None],)) / seq_len

    batched = vmap(grad_and_value(sequence_loss), in_dims=(None, 0))
    weights = dict(module.named_parameters())

    def run(windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with warnings.catch_warnings():
            # vmap has no batching rule for some attention backward kernels and loops over the
            # sequences there; that is what it costs (benchmarks/per_example_cost.py), not a fault.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
            grads, losses = batched({n: weights[n].detach() for n in names}, windows)
        return [grads[n] for n in names], losses * seq_len

    return run
