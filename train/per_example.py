"""Per-unit gradient moments of one step: the sums the per-example statistics and the optimizer
variants of train/adam_variants.py need, and their one reduction over ranks.

A *unit* is what one gradient g_u belongs to: a sequence or a token position (per-example
statistics, `trainer.per_example_unit`; the idea of Roulet & Agarwala 2025, arXiv:2510.00236, of
which only the abstract was read) or a micro-batch (batch-size-invariant Adam, Wang & Aitchison
2024). Over the U units of the global batch, the step keeps

    sum_u g_u                  -> the mean gradient mu_hat (what every optimizer steps with)
    sum_u (g_u - mu_hat)^2     -> M2, elementwise: the second-moment inputs of the MicroAdam variants
    sum_u sign(g_u)            -> the mean of per-unit signs (signSGD with the sign first)
    sum_u |g_u|, |g_u|^2 and |g_u,k|^2 per parameter group k (the statistics below)

M2 is formed stably (Chan, Golub & LeVeque 1979, the pairwise update): each delivery of k units is
centred on its own mean (two passes over those k), then merged into the running sums with the
correction delta^2 c k / (c + k), and ranks merge the same way (`finish`). The one-pass form
sum_u g_u^2 - U mu_hat^2 cancels where |mu| >> sigma (every digit of fp32 at |mu| / sigma = 10^3).
Per-token units arrive as sums, not as per-token gradients (train/unit_backward.py): within a
micro-batch their M2 is the one-pass form, accumulated in fp32; across micro-batches and ranks
the merge is Chan's.

How a unit's gradient reaches these sums:
- one unit per micro-batch (invariant Adam): the micro-batch's own backward, moved out of
  `.grad` after it (`add_grads`, no extra compute);
- sequences or tokens (per-example statistics and the per-example optimizers): formed inside the
  backward, layer by layer (train/unit_backward.py, `merge` and `add_factored`).

Either way nothing syncs through DDP's reducer: `finish` all-reduces the sums in one flat buffer.

The statistics (all with the unbiased estimators of McCandlish et al. 2018, App. A, written for
U per-unit gradients instead of two batch sizes):

    tr(Sigma)  = U / (U - 1) * (mean_u |g_u|^2 - |mu_hat|^2)     per-unit noise (trace of covariance)
    |G|^2      = |mu_hat|^2 - tr(Sigma) / U                       the true gradient's squared norm
    B_simple   = tr(Sigma) / |G|^2                                in units (sequences or tokens)
    SNR_k      = |G_k|^2 / tr(Sigma_k)                            per parameter group k, per unit

SNR_k is the per-unit signal-to-noise ratio of group k; a batch of B units has B x SNR_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from records.metrics import GROUPS


@dataclass
class Moments:
    """One step's per-unit moments over every rank, as the optimizer and the statistics take them."""

    units: int  # U: units in the global batch
    m2: list[torch.Tensor] | None  # per parameter: sum_u (g_u - mu_hat)^2 (None: not kept)
    mean_sign: list[torch.Tensor] | None  # per parameter: mean_u sign(g_u) (None: not kept)
    # The norm sums, still on the device (None where `UnitGradients` was told to skip them), in
    # float64: [sum_u |g_u|, sum_u |g_u|^2, sum_u |g_u,k|^2 per group k, |mu_hat_k|^2 per group k].
    # The trainer reads them with the rest of the step's figures, one step later (no host sync).
    sums: torch.Tensor | None = None
    groups: list[str] = field(default_factory=list)
    unit: str = "sequence"  # what a unit is: per-token statistics are logged under their own keys

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
        if self.unit == "token":  # in tokens, not sequences: never read as the sequences' figures
            return {key.removesuffix("_exact") + "_token": value for key, value in out.items()}
        return out


class UnitGradients:
    """Accumulates the per-unit sums of one step (see the module docstring) for `params`, in
    `groups` (records/metrics.py GROUPS, one per parameter: train/model.py `parameter_groups`);
    `squares` and `signs` say which elementwise sums to keep, `norms` whether to keep the norm
    sums the statistics need (invariant Adam's step does not: skipping them spares every
    micro-batch a norm pass); `unit` names what a unit is (for the statistics' keys).

    The sums live in one flat buffer ([sum, sign, M2], allocated once, zeroed each step): the
    all-reduces over ranks take it in two slices (no gather into a temporary), and no step
    allocates model-sized tensors but the cross-rank merge's. Nothing here reads a value to the
    host.

    A step: `begin`; units delivered by `add_grads` (one per micro-batch), or by `merge` /
    `add_factored` per parameter plus `add_group_norms`, each micro-batch closed by `close(k)`;
    then `finish`."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        groups: list[str],
        squares: bool,
        signs: bool,
        norms: bool = True,
        unit: str = "sequence",
    ) -> None:
        self.params, self.unit = params, unit
        self.squares, self.signs, self.keep_norms = squares, signs, norms
        self.groups = [k for k in GROUPS if k in groups]
        self.group_index = [self.groups.index(k) for k in groups]  # per parameter, on the host
        device = params[0].device
        self.group_of = torch.tensor(self.group_index, device=device)
        self.units = 0  # units closed so far this step (this rank)
        # What every delivered unit is multiplied by, once, in `finish` (the sums are linear in it,
        # M2 and the squared norms quadratic): units may arrive as gradients of the summed loss.
        self.scale = 1.0
        parts = 1 + signs + squares
        size = sum(p.numel() for p in params)
        self.flat = torch.zeros(parts * size, device=device, dtype=params[0].dtype)
        views, offset = [], 0
        for _ in range(parts):
            for p in params:
                views.append(self.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        n = len(params)
        self.sum = views[:n]
        self.sign = views[n : 2 * n] if signs else []
        self.sq = views[(1 + signs) * n :] if squares else []  # M2 (or raw squares, see above)
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

    def merge(self, i: int, grads: torch.Tensor) -> None:
        """Merge k units of parameter i (`grads`: (k, *shape), each row a unit's gradient) into
        its sums, M2 by Chan's update against the units closed before this micro-batch; the
        caller closes the micro-batch (`close(k)`) once every parameter has its k."""
        k, c = grads.shape[0], self.units
        total = grads.sum(0)
        if self.squares:
            mean = total / k
            m2 = (grads - mean).square_().sum(0)  # centred on the delivery's own mean
            if c:
                delta = mean.sub_(self.sum[i], alpha=1 / c)  # the delivery's mean - the running mean
                m2.addcmul_(delta, delta, value=c * k / (c + k))
            self.sq[i].add_(m2)
        self.sum[i].add_(total)
        if self.signs:
            self.sign[i].add_(grads.sign().sum(0))

    def add_factored(
        self, i: int, total: torch.Tensor, squares: torch.Tensor | None, signs: torch.Tensor | None
    ) -> None:
        """Add per-token units of parameter i as their sums: sum_t g_t, sum_t g_t^2, sum_t sign g_t
        (train/unit_backward.py forms them without any per-token gradient)."""
        self.sum[i].add_(total)
        if self.squares and squares is not None:
            self.sq[i].add_(squares)
        if self.signs and signs is not None:
            self.sign[i].add_(signs)

    def add_group_norms(self, per_group: torch.Tensor) -> None:
        """`per_group`: (groups, n) float64 squared norms of n units' gradients, group by group."""
        if not self.keep_norms:
            return
        total = per_group.sum(0)
        self.norms += torch.cat([total.sqrt().sum()[None], total.sum()[None], per_group.sum(1)])

    def close(self, k: int) -> None:
        """End a delivery of k units to every parameter."""
        self.units += k

    def add(self, grads: list[torch.Tensor]) -> None:
        """Add n units to every parameter at once: `grads[i]` is (n, *shape of params[i])."""
        for i, g in enumerate(grads):
            self.merge(i, g)
        if self.keep_norms:
            squares = (
                torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]).double().square()
            )
            per_group = torch.zeros(
                len(self.groups), squares.shape[1], device=squares.device, dtype=torch.float64
            )
            self.add_group_norms(per_group.index_add_(0, self.group_of, squares))
        self.close(grads[0].shape[0])

    def add_grads(self, factor: float) -> None:
        """Add one unit from `.grad`, which holds the unit's mean gradient divided by `factor`, and
        clear `.grad` for the next micro-batch's backward (foreach ops: one unit per micro-batch
        must not cost a Python loop per parameter)."""
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]  # all of them: the filter is for mypy
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        sums = [self.sum[i] for i in present]
        c = self.units
        if self.squares and c:  # Chan's update with k = 1: M2 += (g - mean)^2 c / (c + 1)
            delta = torch._foreach_mul(sums, -1 / c)
            torch._foreach_add_(delta, grads, alpha=factor)
            torch._foreach_addcmul_([self.sq[i] for i in present], delta, delta, value=c / (c + 1))
        torch._foreach_add_(sums, grads, alpha=factor)
        if self.signs:
            torch._foreach_add_([self.sign[i] for i in present], torch._foreach_sign(grads))
        if self.keep_norms:
            norms = torch.zeros(len(self.params), device=self.group_of.device, dtype=torch.float64)
            if present not in self._present:  # made once: a Python list as an index is a host copy
                self._present[present] = torch.tensor(present, device=norms.device, dtype=torch.long)
            squares = torch.stack(torch._foreach_norm(grads)).double().square() * factor**2
            norms.index_copy_(0, self._present[present], squares)
            per_group = torch.zeros(len(self.groups), 1, device=norms.device, dtype=torch.float64)
            self.add_group_norms(per_group.index_add_(0, self.group_of, norms[:, None]))
        self.close(1)
        for p in params:
            p.grad = None

    def finish(self, world: int) -> tuple[Moments, torch.Tensor]:
        """Set `.grad` to the mean gradient over every unit of every rank and return the moments,
        plus this rank's squared norm of its own mean gradient (the small-batch half of the
        two-batch noise estimate, taken before the reduction)."""
        c, size = self.units, len(self.flat) // (1 + self.signs + self.squares)
        if self.scale != 1:
            self.flat[:size].mul_(self.scale)
            if self.squares:
                self.flat[-size:].mul_(self.scale**2)
            self.norms[:1].mul_(self.scale)
            self.norms[1:].mul_(self.scale**2)
        # Per-token units arrive as sum_t g_t^2, not centred sums (`add_factored`): centred here,
        # sum_t g_t^2 - (sum_t g_t)^2 / c, the one-pass form (see the module docstring).
        if self.squares and self.unit == "token":
            torch._foreach_addcmul_(self.sq, self.sum, self.sum, value=-1 / c)
            torch._foreach_clamp_min_(self.sq, 0.0)
        # |sum / n|^2 from the sums' norms: no copy of the gradients
        local_sq = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.sum)).float()) ** 2
        local_sq /= c**2
        units = c * world  # every rank closes the same number of units
        linear = self.flat[: size * (1 + self.signs)]
        if world > 1:
            local_mean = list(torch._foreach_div(self.sum, float(c))) if self.squares else []
            dist.all_reduce(linear)  # sums and signs
            if self.squares:  # Chan across ranks: M2 += c (mean_rank - mean)^2, then summed
                torch._foreach_add_(local_mean, self.sum, alpha=-1 / units)
                torch._foreach_addcmul_(self.sq, local_mean, local_mean, value=float(c))
                dist.all_reduce(self.flat[linear.numel() :])
            if self.keep_norms:
                dist.all_reduce(self.norms)  # a few float64 scalars (see __init__)
        linear.div_(float(units))  # sums -> means, in place
        for p, mean in zip(self.params, self.sum, strict=True):
            p.grad = mean
        moments = Moments(
            units=units,
            m2=self.sq if self.squares else None,
            mean_sign=self.sign if self.signs else None,
            unit=self.unit,
        )
        if self.keep_norms:
            norms = torch.stack(torch._foreach_norm(self.sum)).double() ** 2
            group_mean = torch.zeros(len(self.groups), device=norms.device, dtype=torch.float64)
            group_mean.index_add_(0, self.group_of, norms)
            moments.sums, moments.groups = torch.cat([self.norms, group_mean]), self.groups
        return moments, local_sq
