"""Per-unit gradients formed inside the backward, layer by layer, and reduced on the spot.

Every weight of the decoder is used by one of three kinds of module, and for each the gradient
of one unit (a sequence, or a token position) is cheap to form from what the backward has anyway,
the layer's input x and the gradient delta of its output:

    Linear     per sequence u:  G_u = sum_{t in u} delta_t x_t^T     a bmm over the micro-batch's
                                                                      sequences (the mm, split)
               per token t:     G_t = delta_t x_t^T (rank one), so    sum_t G_t^2 = (delta^2)^T (x^2),
                                sum_t sign G_t = sign(delta)^T sign(x), |G_t|^2 = |delta_t|^2 |x_t|^2
    Embedding  row id_t gets delta_t: per sequence, rows summed within the sequence; per token,
               scatter-adds of delta_t, delta_t^2 and sign(delta_t)
    Norm       the weight scales its normalised input h: G = sum over the unit of delta_t * h_t
               (RMSNorm; Gemma's (1 + weight); LayerNorm, whose bias takes sum delta_t)
    Conv1D     GPT-2's Linear with its weight stored (in, out): the transposed units

Each module's backward hands its units to a `UnitCollector`, which folds them into the step's sums
(train/per_example.py: sum, Chan-merged M2, signs, per-group norms) and drops them: at no time
does a per-unit gradient of the whole model exist, only of one layer (per sequence) or none at all
(per token: extra GEMMs of the layer's shape). The weight gradient itself is the sum of the units,
so the mm of the plain backward is replaced, not repeated: no extra matmul FLOPs per sequence,
two extra GEMMs (squares, signs: only where asked for) per token. This is the pattern of
CerebrasResearch/nanoGNS (per-example norms formed with the weight gradient) and, per token, of
BackPACK (Dangel et al. 2019, whose extensions the abstract of Roulet & Agarwala 2025 v2 says it
builds on; the paper's own derivations were not readable here).

Ghost norms (Opacus: |G_u|^2 = <x_u x_u^T, delta_u delta_u^T>, T^2 (d_in + d_out) per sequence)
beat the bmm's T d_in d_out only for T < d_in d_out / (d_in + d_out): 21-62 tokens on the tiny
model, 112-891 on Qwen2.5-0.5B, below the studies' sequence lengths; and they give no elementwise
squares, which MicroAdam needs.

What a token's gradient is: the contribution of position t to the batch gradient, delta_t x_t^T in
every layer (the LM head's is exactly token t's loss gradient; deeper layers' also carry the
losses of later positions through attention). They sum to the batch gradient as the sequences'
do, but they are not independent draws of it.

A weight used more than once in a micro-batch (the LM head tied to the embedding table; the LM
head over several loss chunks) keeps its per-sequence gradient (units x shape) until its last use,
then is folded: exact, at the memory of one such tensor. Per token, the tied head and table meet
only at row id_t of position t, where the cross terms are added from what the head left behind
(its logit gradient at id_t and its input h_t).

The trainer drives a micro-batch through `UnitCollector.micro_batch`: the forward through the
module itself (not through DDP: nothing reduces in its buckets), the backward of the summed loss,
then `close`. `install` swaps the forward of every Linear, Embedding and RMSNorm of the model for
one that routes through here while a micro-batch is collected and is the plain forward otherwise
(evaluation, the noise probe); the swapped forwards run eagerly under torch.compile (graph breaks
at each), so a compiled layer fuses what lies between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from train.config import PER_EXAMPLE_UNITS
from train.fused_loss import compute_dtype
from train.per_example import UnitGradients


@dataclass(frozen=True)
class Route:
    """Where a module's units go: its weight's (and bias's) place in the sums."""

    collector: UnitCollector
    weight: int
    bias: int | None = None
    # GPT-2's Conv1D stores its weight (in, out), as x @ W: its units are the transposes
    transposed: bool = False


class UnitCollector:
    """Receives one micro-batch's per-unit gradients from the layers (see the module docstring)
    and folds them into `sums`. `index`: each parameter's place in `sums.params`; `unit`: one of
    `PER_EXAMPLE_UNITS`; `seq_len`: tokens per sequence."""

    def __init__(self, sums: UnitGradients, loss: torch.nn.Module, unit: str, seq_len: int) -> None:
        if unit not in PER_EXAMPLE_UNITS:
            raise ValueError(
                f"trainer.per_example_unit={unit!r}: expected one of {', '.join(PER_EXAMPLE_UNITS)}"
            )
        self.sums, self.loss, self.unit, self.seq_len = sums, loss, unit, seq_len
        self.index = {id(p): i for i, p in enumerate(sums.params)}
        # A unit's gradient is the mean-token gradient of its sequence, or its position's
        # contribution to the gradient of the summed loss (the backward here is of the sum): the
        # sums scale what arrives once, at the step's end.
        sums.scale = 1 / seq_len if unit == "sequence" else 1.0
        self.active = self.counting = False
        self.uses = [0] * len(sums.params)
        self.pending: dict[int, torch.Tensor] = {}
        self.inputs = torch.empty(0, dtype=torch.long)
        self.units_in_micro = 0
        self.unit_sq = torch.empty(0)
        self.routes: dict[int, Route] = {}  # by id(module), as `install` routed them
        self.embedded: set[int] = set()  # parameters an Embedding uses (`install` fills it)
        self.norms: dict[int, list[torch.Tensor]] = {}  # per group: the folded units' norms, this micro-batch
        # Per token, a head tied to an embedding table leaves c_t (its logit gradient at id_t) and
        # h_t (its input) of every position for the table's cross terms.
        self.tied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- a micro-batch
    def micro_batch(self, micro: torch.Tensor, autocast: Callable[[], Any]) -> torch.Tensor:
        """Forward and backward of `micro` (n, seq_len + 1) with its units collected; returns its
        summed token loss (detached)."""
        n = micro.shape[0]
        self.inputs = micro[:, :-1]
        self.units_in_micro = n if self.unit == "sequence" else n * self.seq_len
        groups = len(self.sums.groups)
        self.unit_sq = torch.zeros(groups, self.units_in_micro, device=micro.device, dtype=torch.float64)
        self.uses = [0] * len(self.uses)
        self.active = self.counting = True
        try:
            with autocast():
                part = self.loss(micro)
            self.counting = False  # a checkpointed chunk recomputed in backward is not a new use
            part.backward()
            for i in sorted(self.pending):
                self._fold(i, self.pending.pop(i))
            for group, norms in self.norms.items():
                self.unit_sq[group] += torch.stack(norms).double().square().sum(0)
        finally:
            self.active = self.counting = False
            self.pending.clear()
            self.tied.clear()
            self.norms.clear()
        self.sums.add_group_norms(self.unit_sq)
        self.sums.close(self.units_in_micro)
        return part.detach()

    def use(self, route: Route) -> None:
        if self.counting:
            self.uses[route.weight] += 1

    def route_of(self, module: torch.nn.Module) -> Route:
        """The route `install` gave `module` (the fused loss delivers the LM head's units itself)."""
        return self.routes[id(module)]

    # --- what the layers deliver
    def linear(self, route: Route, x: torch.Tensor, delta: torch.Tensor, first_row: int = 0) -> None:
        """A Linear's input x and output gradient delta, (n, T, .) for a whole micro-batch or
        (rows, .) for rows [first_row, first_row + rows) of its flattened tokens (a loss chunk)."""
        if self.unit == "token":
            x2, d2 = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])
            self._linear_tokens(route, x2, d2, first_row if x.dim() == 2 else 0)
            return
        per_unit, bias, first = self._per_sequence(
            x, delta, first_row, route.bias is not None, route.transposed
        )
        self._deliver(route.weight, per_unit, first)
        if route.bias is not None and bias is not None:
            self._deliver(route.bias, bias, first)

    def embedding(self, route: Route, ids: torch.Tensor, delta: torch.Tensor) -> None:
        """An embedding lookup's ids (n, T) and output gradient (n, T, d)."""
        i = route.weight
        weight = self.sums.params[i]
        d = delta.float()
        if self.unit == "sequence":
            pending = self._pending(i, weight)
            units = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
            pending.index_put_((units, ids), d, accumulate=True)
            return
        flat, d2 = ids.reshape(-1), d.reshape(-1, d.shape[-1])
        total = torch.zeros_like(weight).index_add_(0, flat, d2)
        squares = torch.zeros_like(weight).index_add_(0, flat, d2 * d2) if self.sums.squares else None
        signs = torch.zeros_like(weight).index_add_(0, flat, d2.sign()) if self.sums.signs else None
        norms = _row_sq(d2)
        if i in self.tied:  # the head's gradient at row id_t of the same position: the cross terms
            c, h = self.tied.pop(i)
            head_row = c[:, None] * h  # the head's gradient of position t, row id_t
            norms = norms + 2 * (head_row * d2).sum(1)
            if squares is not None:
                squares.index_add_(0, flat, 2 * head_row * d2)
            if signs is not None:
                signs.index_add_(0, flat, (head_row + d2).sign() - head_row.sign() - d2.sign())
        self.sums.add_factored(i, total, squares, signs)
        self.unit_sq[self.sums.group_index[i]] += norms.double()

    def scale(self, route: Route, h: torch.Tensor, delta: torch.Tensor) -> None:
        """A norm's normalised input h and output gradient, (n, T, d): its weight scales h
        elementwise, its bias (LayerNorm's, if any) is added."""
        self._elementwise(route.weight, delta * h)  # each position's gradient, as autograd's mul forms it
        if route.bias is not None:
            self._elementwise(route.bias, delta)

    def _elementwise(self, i: int, g: torch.Tensor) -> None:
        """Parameter i's gradient at each position, (n, T, d), summed over each unit."""
        if self.unit == "sequence":
            self._deliver(i, g.sum(1), 0)
            return
        g2 = g.reshape(-1, g.shape[-1]).float()
        squares = (g2 * g2).sum(0) if self.sums.squares else None
        signs = g2.sign().sum(0) if self.sums.signs else None
        self.sums.add_factored(i, g2.sum(0), squares, signs)
        self.unit_sq[self.sums.group_index[i]] += _row_sq(g2).double()

    # --- internals
    def _linear_tokens(self, route: Route, x: torch.Tensor, d: torch.Tensor, first_row: int) -> None:
        rows = slice(first_row, first_row + x.shape[0])
        i = route.weight

        def outer(
            a: torch.Tensor, b: torch.Tensor
        ) -> torch.Tensor:  # sum_t a_t b_t^T, as the weight is laid out
            return b.t() @ a if route.transposed else a.t() @ b

        squares = outer(d * d, x * x).float() if self.sums.squares else None
        signs = outer(d.sign().float(), x.sign().float()) if self.sums.signs else None  # exact counts
        self.sums.add_factored(i, outer(d, x).float(), squares, signs)
        d_sq = _row_sq(d)
        self.unit_sq[self.sums.group_index[i], rows] += (d_sq * _row_sq(x)).double()
        if route.bias is not None:
            db = d.float()
            self.sums.add_factored(
                route.bias,
                db.sum(0),
                (db * db).sum(0) if self.sums.squares else None,
                db.sign().sum(0) if self.sums.signs else None,
            )
            self.unit_sq[self.sums.group_index[route.bias], rows] += d_sq.double()
        if i in self.embedded:  # the head tied to the table: keep what the table's cross terms need
            if i not in self.tied:
                n = self.inputs.numel()
                self.tied[i] = (
                    x.new_zeros(n, dtype=torch.float32),
                    x.new_zeros(n, x.shape[1], dtype=torch.float32),
                )
            c, h = self.tied[i]
            c[rows] = d.gather(1, self.inputs.reshape(-1)[rows, None]).squeeze(1).float()
            h[rows] = x.float()

    def _per_sequence(
        self, x: torch.Tensor, delta: torch.Tensor, first_row: int, with_bias: bool, transposed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The per-sequence weight (and, `with_bias`, bias) gradients of x and delta, (n, T, .) or
        rows [first_row, first_row + rows) of the flattened tokens, and the first unit: one bmm
        where the rows are whole sequences, else one mm per (part of a) sequence they span. The
        bias sums are skipped where there is no bias (the LM head's delta is tokens x vocabulary)."""
        if x.dim() == 2 and (first_row % self.seq_len or x.shape[0] % self.seq_len):
            t, rows = self.seq_len, x.shape[0]
            first = first_row // t
            spans = [
                (max(u * t, first_row) - first_row, min((u + 1) * t, first_row + rows) - first_row)
                for u in range(first, (first_row + rows - 1) // t + 1)
            ]
            left, right = (x, delta) if transposed else (delta, x)
            weights = torch.stack([left[a:b].t() @ right[a:b] for a, b in spans])
            biases = torch.stack([delta[a:b].sum(0) for a, b in spans]) if with_bias else None
            return weights, biases, first
        if x.dim() == 2:  # whole sequences: viewed as (units, T, .)
            x, delta = x.view(-1, self.seq_len, x.shape[1]), delta.view(-1, self.seq_len, delta.shape[1])
        weights = torch.bmm(x.transpose(1, 2), delta) if transposed else torch.bmm(delta.transpose(1, 2), x)
        return weights, delta.sum(1) if with_bias else None, first_row // self.seq_len

    def _deliver(self, i: int, per_unit: torch.Tensor, first: int) -> None:
        """Units [first, first + k) of parameter i, raw (gradients of the summed loss)."""
        k = per_unit.shape[0]
        whole = first == 0 and k == self.units_in_micro and i not in self.pending
        if whole and self.uses[i] == 1:
            self._fold(i, per_unit)
        elif whole:  # the first of several uses, whole: it becomes the pending sum (no zeros, no add)
            self.pending[i] = per_unit.float()
        else:
            self._pending(i, self.sums.params[i])[first : first + k] += per_unit.float()

    def _pending(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        if i not in self.pending:
            shape = (self.units_in_micro, *weight.shape)
            self.pending[i] = torch.zeros(shape, device=weight.device, dtype=torch.float32)
        return self.pending[i]

    def _fold(self, i: int, per_unit: torch.Tensor) -> None:
        """Every unit of parameter i in this micro-batch, raw (the sums scale them once, at the
        step's end: `UnitGradients.scale`): into the sums, and its units' norms set aside to be
        added group by group at the micro-batch's end (a few kernels, not a few per parameter)."""
        g = per_unit.to(self.sums.params[i].dtype)
        self.sums.merge(i, g)
        if self.sums.keep_norms:
            self.norms.setdefault(self.sums.group_index[i], []).append(
                torch.linalg.vector_norm(g.flatten(1), dim=1)
            )


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    """Each row's squared norm, in fp32: one reduction, no squared copy of `t` (the LM head's
    logit gradient is tokens x vocabulary)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).square()


# ----------------------------------------------------------------------------- the autograd functions


class _UnitLinear(torch.autograd.Function):
    """F.linear whose weight (and bias) gradient goes to a collector instead of `.grad`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        route: Route,
        first_row: int,
    ) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # its dtype, as written: not recast again
            dtype = compute_dtype(x, weight)
            with torch.autocast(device_type=x.device.type, enabled=False):
                xc, w = x.to(dtype), weight.to(dtype)
                out = F.linear(xc, w, None if bias is None else bias.to(dtype))
        else:
            xc, w, out = x, weight, F.linear(x, weight, bias)
        ctx.save_for_backward(xc, w)
        ctx.route, ctx.first_row = route, first_row
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xc, w = ctx.saved_tensors
        delta = grad_out.to(w.dtype)
        ctx.route.collector.linear(ctx.route, xc, delta, ctx.first_row)
        return delta @ w, None, None, None, None


class _UnitEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, route: Route, padding: int | None
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.route, ctx.padding = route, padding
        return F.embedding(ids, weight, padding)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, ...]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        if ctx.padding is not None:  # the padding row takes no gradient (F.embedding's rule)
            grad_out = grad_out.masked_fill((ids == ctx.padding)[..., None], 0)
        ctx.route.collector.embedding(ctx.route, ids, grad_out)
        return None, None, None, None


class _UnitAffine(torch.autograd.Function):
    """(offset + weight) * h + bias (a norm's last operations: offset 0, or 1 for Gemma's norms;
    a bias for LayerNorm), the weight's and bias's gradients to a collector."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        offset: float,
        route: Route,
    ) -> torch.Tensor:
        scale = weight + offset if offset else weight
        ctx.save_for_backward(h, scale)
        ctx.route = route
        out = scale * h
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        h, scale = ctx.saved_tensors
        ctx.route.collector.scale(ctx.route, h, grad_out)
        return grad_out * scale, None, None, None, None


# ----------------------------------------------------------------------------- installing them


def _eager(forward: Callable[..., torch.Tensor], compiled: bool) -> Callable[..., torch.Tensor]:
    """`forward` as torch.compile must leave it (run eagerly: a graph break) where the model is
    compiled; as it is otherwise (the disabling wrapper costs a few microseconds a call)."""
    return torch.compiler.disable(forward) if compiled else forward


def _linear_forward(module: torch.nn.Module, route: Route, compiled: bool) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        collector = route.collector
        if not (collector.active and torch.is_grad_enabled()):
            plain: torch.Tensor = type(module).forward(module, x)
            return plain
        collector.use(route)
        weight: torch.Tensor = module.weight  # type: ignore[assignment]  # a Linear's or Conv1D's
        out: torch.Tensor = _UnitLinear.apply(
            x, weight.t() if route.transposed else weight, module.bias, route, first_row
        )
        return out

    return _eager(forward, compiled)


def _embedding_forward(
    module: torch.nn.Embedding, route: Route, compiled: bool
) -> Callable[..., torch.Tensor]:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        collector = route.collector
        if not (collector.active and torch.is_grad_enabled()):
            plain: torch.Tensor = type(module).forward(module, ids)
            return plain
        collector.use(route)
        out: torch.Tensor = _UnitEmbedding.apply(ids, module.weight, route, module.padding_idx)
        scale = getattr(module, "embed_scale", None)  # Gemma's scaled table: its gradient is scaled too
        return out if scale is None else out * scale.to(module.weight.dtype)

    return _eager(forward, compiled)


def normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm's input normalised, in its input dtype, as the norm forms it before its weight (and
    bias) apply: LayerNorm's (x - mean) / std, or an RMSNorm's x / rms (Qwen2, Llama, Mistral,
    OLMo2, Gemma)."""
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    h = x.float()
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 0.0)))
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _norm_forward(
    module: torch.nn.Module, route: Route, offset: float, compiled: bool
) -> Callable[..., torch.Tensor]:
    plain = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        collector = route.collector
        if not (collector.active and torch.is_grad_enabled()):
            out: torch.Tensor = plain(module, x)
            return out
        collector.use(route)
        bias = getattr(module, "bias", None)
        scaled: torch.Tensor = _UnitAffine.apply(normalised(module, x), module.weight, bias, offset, route)
        return scaled

    return _eager(forward, compiled)


def norm_offset(module: torch.nn.Module) -> float | None:
    """For a norm whose forward is `(offset + weight) * normalised(x) (+ bias)`, its offset: 0
    (LayerNorm; the Qwen2 / Llama / OLMo2 RMSNorm) or 1 (Gemma's). Checked on a probe, not by
    name alone, so a norm with another formula is not taken for one. None: not such a norm."""
    layer_norm = isinstance(module, torch.nn.LayerNorm)
    rms = type(module).__name__.endswith("RMSNorm") and (
        hasattr(module, "variance_epsilon") or hasattr(module, "eps")
    )
    weight = getattr(module, "weight", None)
    if not (layer_norm or rms) or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    bias = getattr(module, "bias", None)
    generator = torch.Generator(device=weight.device).manual_seed(0)  # the run's RNG stays untouched
    with torch.no_grad():
        probe = torch.randn(
            2, 3, weight.shape[0], device=weight.device, dtype=weight.dtype, generator=generator
        )
        out = type(module).forward(module, probe)
        h = normalised(module, probe)
        for offset in (0.0, 1.0):
            expected = (weight + offset) * h + (0 if bias is None else bias)
            if torch.allclose(out, expected, rtol=1e-6, atol=1e-6):
                return offset
    return None


def _bias(collector: UnitCollector, module: torch.nn.Module) -> int | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else collector.index[id(bias)]


def install(model: torch.nn.Module, collector: UnitCollector, compiled: bool = False) -> None:
    """Route every Linear (and GPT-2's Conv1D), Embedding and norm (RMSNorm, Gemma's, LayerNorm)
    of `model` through `collector` (see the module docstring); `compiled`: parts of the model are
    torch.compiled (`trainer.compile`). A trainable parameter of any other module is refused,
    naming it: its units could not be formed, and the statistics would silently leave it out."""
    covered: set[int] = set()
    for module in model.modules():
        offset = None
        if isinstance(module, torch.nn.Linear | Conv1D):
            route = Route(
                collector,
                collector.index[id(module.weight)],
                _bias(collector, module),
                isinstance(module, Conv1D),
            )
            module.forward = _linear_forward(module, route, compiled)  # type: ignore[method-assign]
        elif isinstance(module, torch.nn.Embedding):
            custom = type(module).forward is not torch.nn.Embedding.forward and not hasattr(
                module, "embed_scale"
            )
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse or custom:
                raise ValueError(
                    f"per-example statistics cannot form per-unit gradients of an Embedding with "
                    f"max_norm, scale_grad_by_freq, sparse set or its own forward ({type(module).__name__})"
                )
            route = Route(collector, collector.index[id(module.weight)])
            collector.embedded.add(route.weight)
            module.forward = _embedding_forward(module, route, compiled)  # type: ignore[method-assign]
        elif (offset := norm_offset(module)) is not None:
            route = Route(collector, collector.index[id(module.weight)], _bias(collector, module))
            module.forward = _norm_forward(module, route, offset, compiled)  # type: ignore[method-assign]
        else:
            continue
        collector.routes[id(module)] = route
        covered.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise ValueError(
                f"per-example statistics cannot form per-unit gradients of {name} "
                f"(a parameter of none of Linear, Conv1D, Embedding, RMSNorm, LayerNorm)"
            )
