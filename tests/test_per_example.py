"""Per-example gradient statistics and the optimizer variants they feed (Roulet & Agarwala 2025):
the per-unit gradients formed inside the backward (train/unit_backward.py) exact against loops of
per-sequence and per-token backward passes, with every loss kernel, tied and untied heads,
compiled, on one process and under 2-rank DDP with accumulation; M2's stable merge where the
one-pass form cancels; the variants' second-moment inputs in closed form and by simulation;
MicroAdam = Adam at one sequence; the sign placements in closed form."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from tests.harness import rows, run_world, tiny_run
from train.adam_variants import VariantAdam, second_moment_input
from train.batching import plan_batches
from train.config import ModelConfig, OptimizerConfig
from train.loop import Units, accumulate_gradients
from train.model import TokenLoss, build_model, parameter_groups
from train.per_example import Moments, UnitGradients
from train.unit_backward import UnitCollector, install, norm_offset, normalised

SEQ = 16


def _tiny_loss(tied: bool = True, chunk: int = 0, kernel: str = "chunked", arch: str = "qwen2") -> TokenLoss:
    cfg = ModelConfig(
        arch=arch,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        num_kv_heads=2 if arch == "gpt2" else 1,
        tie_word_embeddings=tied,
    )
    return TokenLoss(build_model(cfg, seed=0), chunk, kernel)


def _groups(loss: TokenLoss) -> list[str]:
    by_id = parameter_groups(loss)
    return [by_id[id(p)] for p in loss.parameters()]


def _windows(n: int) -> torch.Tensor:
    """Counting sequences (token t + 1 follows t) from random starts, a quarter of the tokens random:
    a gradient with a clear common direction (B_simple > 0 measurable from 8 sequences)."""
    gen = torch.Generator().manual_seed(1)
    counting = (torch.randint(0, 64, (n, 1), generator=gen) + torch.arange(SEQ + 1)) % 64
    noise = torch.randint(0, 64, (n, SEQ + 1), generator=gen)
    return torch.where(torch.rand(n, SEQ + 1, generator=gen) < 0.25, noise, counting)


def _flat_grads(loss: TokenLoss) -> torch.Tensor:
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in loss.parameters()]
    loss.zero_grad(set_to_none=True)
    return torch.cat([g.flatten() for g in grads]).double()


def _per_sequence(loss: TokenLoss, windows: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean-token gradient, one backward pass per sequence: (n, numel) rows."""
    out = []
    for w in windows:
        (loss(w[None]) / SEQ).backward()
        out.append(_flat_grads(loss))
    return torch.stack(out)


def _per_token(loss: TokenLoss, windows: torch.Tensor) -> torch.Tensor:
    """Each position's contribution to the gradient of the summed loss, one backward pass per
    position: every Linear, Embedding and RMSNorm computes `plain(W.detach()) + m (plain(W) -
    plain(W.detach()))` with m selecting that position, so the value is unchanged and only that
    position's uses of each weight carry gradient. (n x SEQ, numel) rows."""
    n = len(windows)
    mask = torch.zeros(n * SEQ)

    def masked(plain, *weights):  # plain(*weights): the module's output with these weights
        base = plain(*(None if w is None else w.detach() for w in weights))
        return base + mask.view(n, SEQ, 1) * (plain(*weights) - base)

    def affine(m, x, offset):  # a norm's forward, of its weights
        h = normalised(m, x)
        return lambda w, b: (w + offset) * h + (0 if b is None else b)

    for m in loss.modules():  # instance forwards, removed again below
        if isinstance(m, torch.nn.Linear):
            m.forward = lambda x, m=m: masked(lambda w, b: F.linear(x, w, b), m.weight, m.bias)
        elif isinstance(m, Conv1D):  # x @ W + b
            m.forward = lambda x, m=m: masked(lambda w, b: x @ w + b, m.weight, m.bias)
        elif isinstance(m, torch.nn.Embedding):
            scale = getattr(m, "embed_scale", 1.0)
            m.forward = lambda ids, m=m, s=scale: masked(
                lambda w: F.embedding(ids, w, m.padding_idx) * s, m.weight
            )
        elif (offset := norm_offset(m)) is not None:
            m.forward = lambda x, m=m, o=offset: masked(affine(m, x, o), m.weight, getattr(m, "bias", None))
    out = []
    try:
        for position in range(n * SEQ):
            mask.zero_()[position] = 1
            loss(windows).backward()
            out.append(_flat_grads(loss))
    finally:
        for m in loss.modules():
            m.__dict__.pop("forward", None)
    return torch.stack(out)


def _collect(loss: TokenLoss, windows: torch.Tensor, unit: str, micro: int, compiled: bool = False):
    """One step's units as the trainer forms them: the mean gradient, M2, the mean sign, the moments."""
    params = list(loss.parameters())
    units = Units(UnitGradients(params, _groups(loss), squares=True, signs=True, unit=unit))
    units.collector = loss.units = UnitCollector(units.sums, loss, unit, SEQ)
    if compiled:
        loss.compile_regions()
    install(loss, units.collector, compiled)
    plan = plan_batches(len(windows), micro, 1, SEQ, len(windows) * SEQ)
    loss_sum, _, moments = accumulate_gradients(
        loss, windows, plan, False, contextlib.nullcontext, units=units
    )
    assert moments is not None and moments.m2 is not None and moments.mean_sign is not None
    flat = [
        torch.cat([t.flatten() for t in ts]).double()
        for ts in ([p.grad for p in params], moments.m2, moments.mean_sign)
    ]
    return (*flat, moments, loss_sum)


def _close(a: float, b: float, scale: float = 0.0) -> bool:
    """a == b to 1e-5 of the larger of |b| and `scale` (a difference of two terms, as |G|^2 =
    |mu|^2 - tr / U, is held to the terms' size: near zero it has no relative precision)."""
    return abs(a - b) <= 1e-5 * max(abs(b), scale)


def _key(name: str, unit: str) -> str:
    """A statistic's logged key: per token under its own (train/per_example.py `Moments`)."""
    return name if unit == "sequence" else name.removesuffix("_exact") + "_token"


def _assert_exact(g: torch.Tensor, mean, m2, sign, moments: Moments, loss: TokenLoss) -> None:
    """The units' sums and the statistics against per-unit rows `g` (float64), to 1e-5."""
    u = len(g)
    assert moments.units == u
    truth = g.mean(0)
    scale = truth.abs().max()
    assert (mean - truth).abs().max() <= 1e-5 * scale
    m2_truth = (g - truth).square().sum(0)
    assert (m2 - m2_truth).abs().max() <= 1e-5 * m2_truth.abs().max()
    # A sign is only defined where the unit's gradient is not zero to float rounding: elements
    # within 1e-6 of the largest (float32's reach after a few operations) may flip.
    ambiguous = (g.abs() <= 1e-6 * g.abs().max(1, keepdim=True).values).sum(0)
    assert ((sign - g.sign().mean(0)).abs() <= 2 * ambiguous / u + 1e-6).all()
    # The statistics from the definitions in train/per_example.py, in float64.
    norms = g.norm(dim=1)
    trace = u / (u - 1) * ((norms**2).mean() - truth.norm() ** 2)
    signal = truth.norm() ** 2 - trace / u
    logged = moments.statistics()
    names_seq = ["pe_norm_mean", "pe_norm_std", "noise_trace_exact", "grad_sq_exact", "b_simple_exact"]
    names_seq += [f"snr_{group}" for group in ("embeddings", "attention", "mlp", "norms", "head")]
    stats = {n: logged[_key(n, moments.unit)] for n in names_seq if _key(n, moments.unit) in logged}
    assert len(stats) == len(logged)  # every key logged is the one of its unit
    assert _close(stats["pe_norm_mean"], norms.mean().item())
    assert _close(stats["pe_norm_std"], norms.std(unbiased=False).item())
    assert _close(stats["noise_trace_exact"], trace.item())
    assert _close(stats["grad_sq_exact"], signal.item(), truth.norm().item() ** 2)
    if signal > 0:  # else |G|^2's estimate says no signal: no B_simple is logged
        assert _close(stats["b_simple_exact"], (trace / signal).item())
    else:
        assert "b_simple_exact" not in stats
    offsets = np.cumsum([0] + [p.numel() for p in loss.parameters()])
    groups = _groups(loss)
    for group in set(groups):
        cols = torch.cat(
            [torch.arange(offsets[i], offsets[i + 1]) for i, k in enumerate(groups) if k == group]
        )
        gk, mk = g[:, cols], g[:, cols].mean(0)
        trace_k = u / (u - 1) * ((gk**2).sum(1).mean() - mk.norm() ** 2)
        snr = ((mk.norm() ** 2 - trace_k / u) / trace_k).item()
        assert _close(stats[f"snr_{group}"], snr, (mk.norm() ** 2 / trace_k).item()), group


LOSSES = {
    "full": (0, "chunked"),
    "chunked": (24, "chunked"),
    "fused": (24, "fused"),
}  # 24: chunks cut sequences


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kernel", list(LOSSES))
@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_units_are_exact_against_loops_of_backward_passes(unit, kernel, tied):
    """Two micro-batches per step (accumulation), against one backward pass per unit through the
    plain model (the full loss); the loss kernels' chunks of 24 tokens cut sequences of 16."""
    torch.manual_seed(0)
    windows = _windows(8 if unit == "sequence" else 4)
    reference = _tiny_loss(tied)
    g = _per_sequence(reference, windows) if unit == "sequence" else _per_token(reference, windows)
    loss = _tiny_loss(tied, *LOSSES[kernel])
    mean, m2, sign, moments, loss_sum = _collect(loss, windows, unit, micro=len(windows) // 2)
    _assert_exact(g, mean, m2, sign, moments, loss)
    with torch.no_grad():
        assert loss_sum.item() == pytest.approx(reference(windows).item(), rel=1e-5)
    assert (_key("snr_head", unit) in moments.statistics()) != tied  # tied: the head's is the table's


@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_compiled_layers_and_one_sequence_micro_batches_are_exact(unit):
    """trainer.compile's regional compile (inductor; the per-unit layers run eagerly between its
    graphs), micro-batches of one sequence, the chunked loss."""
    torch.manual_seed(0)
    windows = _windows(4)
    reference = _tiny_loss()
    g = _per_sequence(reference, windows) if unit == "sequence" else _per_token(reference, windows)
    loss = _tiny_loss(True, 24, "chunked")
    mean, m2, sign, moments, _ = _collect(loss, windows, unit, micro=1, compiled=True)
    _assert_exact(g, mean, m2, sign, moments, loss)


@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_under_bf16_autocast_the_mean_is_the_plain_backwards(unit):
    """The autocast branch of the per-unit Linear (bf16 on a GPU; CPU autocast here): the units'
    mean gradient is the plain backward's under the same autocast, to bf16's rounding (2^-8 of
    the largest element, a few roundings)."""
    torch.manual_seed(0)
    windows = _windows(4)
    plain = _tiny_loss(True, 24, "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = plain(windows)
    (total / total.new_tensor(windows[:, 1:].numel())).backward()
    truth = _flat_grads(plain)
    loss = _tiny_loss(True, 24, "fused")
    params = list(loss.parameters())
    units = Units(UnitGradients(params, _groups(loss), squares=True, signs=False, unit=unit))
    units.collector = loss.units = UnitCollector(units.sums, loss, unit, SEQ)
    install(loss, units.collector)
    plan = plan_batches(len(windows), 2, 1, SEQ, len(windows) * SEQ)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    accumulate_gradients(loss, windows, plan, False, bf16, units=units)
    mean = torch.cat([p.grad.flatten() for p in params]).double()
    assert (mean - truth).abs().max() <= 2e-2 * truth.abs().max()


def test_a_parameter_of_an_unknown_module_is_refused_and_norms_are_told_by_their_formula():
    loss = _tiny_loss()
    collector = UnitCollector(
        UnitGradients(list(loss.parameters()), _groups(loss), False, False), loss, "sequence", SEQ
    )
    norm = loss.lm.model.norm
    assert norm_offset(norm) == 0.0
    with torch.no_grad():
        norm.weight.normal_()  # the probe tells 0 from 1 for any weight

    class GemmaStyleRMSNorm(type(norm)):  # weight stored as an offset from 1: taken, with offset 1
        def forward(self, x):
            return (1 + self.weight) * normalised(self, x)

    class SquaredRMSNorm(type(norm)):  # another formula: not taken for a norm
        def forward(self, x):
            return self.weight.square() * normalised(self, x)

    norm.__class__ = GemmaStyleRMSNorm
    assert norm_offset(norm) == 1.0
    norm.__class__ = SquaredRMSNorm
    assert norm_offset(norm) is None
    with pytest.raises(ValueError, match=r"model\.norm\.weight \(a parameter of none of Linear, Conv1D"):
        install(loss, collector)


FAMILIES = ["llama", "mistral", "olmo2", "gemma", "gpt2"]


@pytest.mark.parametrize("unit", ["sequence", "token"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_s_units_are_exact_against_loops_of_backward_passes(arch, unit):
    """Each family's own modules (GPT-2's Conv1D, LayerNorm and learned positions; Gemma's scaled
    table and 1 + weight norms; OLMo2's q/k norms) through the chunked loss with accumulation,
    tied (GPT-2, Gemma) and untied heads."""
    torch.manual_seed(0)
    windows = _windows(4)
    tied = arch in ("gpt2", "gemma")
    reference = _tiny_loss(tied, arch=arch)
    g = _per_sequence(reference, windows) if unit == "sequence" else _per_token(reference, windows)
    loss = _tiny_loss(tied, 24, "chunked", arch)
    mean, m2, sign, moments, loss_sum = _collect(loss, windows, unit, micro=2)
    _assert_exact(g, mean, m2, sign, moments, loss)
    with torch.no_grad():
        assert loss_sum.item() == pytest.approx(reference(windows).item(), rel=1e-5)


def test_m2_is_stable_where_the_one_pass_form_cancels():
    """|mu| / sigma = 1e3 in float32, 4 micro-batches of 8 units: the variance from the merged M2
    matches a float64 reference to 1e-3 relative; the one-pass form (M - mu^2) does not come near."""
    gen = torch.Generator().manual_seed(0)
    mu, sigma = 1000.0, 1.0
    g64 = mu + sigma * torch.randn(32, 64, generator=gen, dtype=torch.float64)
    g = g64.float()
    p = torch.nn.Parameter(torch.zeros(64))
    units = UnitGradients([p], ["mlp"], squares=True, signs=False, norms=False)
    units.begin()
    for part in g.split(8):
        units.merge(0, part)
        units.close(len(part))
    moments, _ = units.finish(world=1)
    assert moments.m2 is not None
    (variance,) = second_moment_input("micro_adam_var", [p.grad], moments.m2, 32)
    truth = g.double().var(0)  # of the float32 values the units held, in float64
    assert ((variance.double() - truth).abs() / truth).max() < 1e-3
    one_pass = 32 / 31 * ((g * g).mean(0) - g.mean(0) ** 2)
    assert ((one_pass.double() - truth).abs() / truth).max() > 0.1


def test_the_reference_implementations_example():
    """optax.experimental.microbatching.micro_grad's documented example (the paper's reference code):
    loss 0.5 (x p - t)^2 at p = 0, x = 1, targets 0, 2, 4, 6, so per-example gradients -t. Its MEAN
    accumulator with transform (g, g^2) gives -3 and 14; its per-example norms are 0, 2, 4, 6."""
    p = torch.nn.Parameter(torch.zeros(1))
    x, t = torch.ones(4, 1), torch.tensor([0.0, 2.0, 4.0, 6.0])
    per_example = torch.func.vmap(torch.func.grad(lambda w, xi, ti: 0.5 * (xi @ w - ti) ** 2), (None, 0, 0))
    units = UnitGradients([p], ["mlp"], squares=True, signs=False)
    units.begin()
    units.add([per_example(p.detach(), x, t)])
    moments, _ = units.finish(world=1)
    assert p.grad.item() == -3.0 and moments.m2 is not None
    assert moments.m2[0].item() / 4 + p.grad.item() ** 2 == 14.0  # M = M2 / U + mu^2
    assert moments.sums is not None and moments.sums[:2].tolist() == [12.0, 0 + 4 + 16 + 36]


def test_second_moment_inputs_in_closed_form():
    """On a fixed set of per-example gradients, each variant's input is its formula."""
    g = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [-1.0, 1.0, 0.5], [2.0, 4.0, 0.5]])
    u = len(g)
    mean, mean_sq = g.mean(0), (g * g).mean(0)
    var = g.var(0, unbiased=True)
    m2 = (g - mean).square().sum(0)
    expected = {
        "micro_adam": mean_sq,
        "invariant_adam": mean_sq,
        "micro_adam_var": var,
        "micro_adam_msq": mean**2 - var / u,
    }
    for variant, want in expected.items():
        (got,) = second_moment_input(variant, [mean], [m2], u)
        assert torch.allclose(got, want, atol=1e-6), variant
    assert second_moment_input("micro_adam_var", [mean], [m2], u)[0][2] == 0  # no spread, no variance


def test_variance_and_mean_square_inputs_are_unbiased_by_simulation():
    """Gaussian per-example gradients g ~ N(mu, sigma^2), U = 4: over 20000 draws the mean input of
    micro_adam_var is sigma^2 and of micro_adam_msq is mu^2, while Adam's (the squared mean) is
    mu^2 + sigma^2 / U. Tolerance: 5 standard errors of each average."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, 1.0, -2.0], dtype=torch.float64)
    sigma, u, draws = 1.5, 4, 20000
    g = mu + sigma * torch.randn(draws, u, len(mu), generator=gen, dtype=torch.float64)
    mean = g.mean(1)
    m2 = (g - mean[:, None]).square().sum(1)
    for variant, truth in (("micro_adam_var", sigma**2 + 0 * mu), ("micro_adam_msq", mu**2)):
        (inputs,) = second_moment_input(variant, [mean], [m2], u)
        se = inputs.std(0) / draws**0.5
        assert ((inputs.mean(0) - truth).abs() < 5 * se).all(), variant
    adam = mean**2
    assert ((adam.mean(0) - (mu**2 + sigma**2 / u)).abs() < 5 * adam.std(0) / draws**0.5).all()


def _feed(opt: VariantAdam, param: torch.nn.Parameter, grads: torch.Tensor, signs: bool = False) -> None:
    units = UnitGradients([param], ["mlp"], squares=opt.needs_squares, signs=signs)
    units.begin()
    units.add([grads])
    moments, _ = units.finish(world=1)
    opt.feed(moments)
    opt.step()


def test_micro_adam_on_one_sequence_is_adamw():
    """U = 1: the mean squared per-example gradient is the squared gradient."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ours, adamw = VariantAdam([a], "micro_adam", **hyper), torch.optim.AdamW([b], **hyper)
    for _ in range(5):
        grad = torch.randn(1, 5)
        _feed(ours, a, grad)
        b.grad = grad[0].clone()
        adamw.step()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sign_placements_in_closed_form():
    """Two steps from zero state, lr 0.1, beta1 0.5, on per-example gradients whose signs disagree."""
    steps = [
        torch.tensor([[1.0, -3.0], [2.0, 1.0], [-1.0, 1.0]]),
        torch.tensor([[-1.0, 1.0], [-2.0, 1.0], [1.0, 1.0]]),
    ]
    lr, b1 = 0.1, 0.5
    expected = {}
    m, total = torch.zeros(2), torch.zeros(2)
    for g in steps:  # sign_ema: EMA of the mean, then the sign
        m = b1 * m + (1 - b1) * g.mean(0)
        total -= lr * m.sign()
    expected["sign_ema"] = total
    for variant, direction in (
        ("sign_mean", lambda g: g.mean(0).sign()),
        ("sign_example", lambda g: g.sign().mean(0)),
    ):
        m, total = torch.zeros(2), torch.zeros(2)
        for t, g in enumerate(steps, start=1):
            m = b1 * m + (1 - b1) * direction(g)
            total -= lr * m / (1 - b1**t)
        expected[variant] = total
    for variant, want in expected.items():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = VariantAdam([p], variant, lr=lr, betas=(b1, 0.999))
        for g in steps:
            _feed(opt, p, g, signs=opt.needs_signs)
        assert torch.allclose(p.detach(), want, atol=1e-6), variant
    assert not torch.allclose(expected["sign_example"], expected["sign_mean"])


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["sequence", "token"])
def test_two_ranks_with_accumulation_log_the_statistics_of_one_rank(prepared_data, tmp_path, unit):
    """The same 8 sequences per step on one rank (micro 2, 4 micro-batches) or two (2 each), the
    loss in chunks of 48 tokens (sequences of 32 cut): the same per-example statistics and the same
    losses; and the statistics leave the run AdamW's."""
    budget = 8 * 32 * 3
    kw = {
        "token_budget": budget,
        "micro_batch_size": 2,
        "per_example_stats": True,
        "per_example_unit": unit,
        "loss_chunk_tokens": 48,
    }
    one = tiny_run(prepared_data, tmp_path / "one", **kw)
    two = tiny_run(prepared_data, tmp_path / "two", **kw)
    run_world(one, 1, tmp_path / "g1.pt")
    run_world(two, 2, tmp_path / "g2.pt")
    for rank in (0, 1):  # the units' own reduction read nothing back to the host either
        assert json.loads((tmp_path / f"g2-reads-{rank}.json").read_text()) == {"steps": 2}
    logged = [rows(Path(c.run_dir)) for c in (one, two)]
    keys = [
        "loss",
        *(_key(k, unit) for k in ("pe_norm_mean", "pe_norm_std", "noise_trace_exact", "grad_sq_exact")),
    ]
    keys.append(_key("snr_mlp", unit))
    for a, b in zip(*logged, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    plain = tiny_run(
        prepared_data, tmp_path / "plain", token_budget=budget, micro_batch_size=2, loss_chunk_tokens=48
    )
    run_world(plain, 1, tmp_path / "g3.pt")
    assert [r["loss"] for r in rows(tmp_path / "plain")] == pytest.approx(
        [r["loss"] for r in logged[0]], rel=1e-5
    )
    assert _key("pe_norm_mean", unit) not in rows(tmp_path / "plain")[0]


def test_micro_adam_through_the_trainer_at_one_sequence_per_step_is_adamw(prepared_data, tmp_path):
    from train.loop import train

    budget = 32 * 6
    adamw = tiny_run(prepared_data, tmp_path / "adamw", batch_size=1, token_budget=budget)
    micro = tiny_run(
        prepared_data,
        tmp_path / "micro",
        batch_size=1,
        token_budget=budget,
        optimizer=OptimizerConfig(name="micro_adam", lr=3e-3),
    )
    train(adamw)
    train(micro)
    a, b = ([r["loss"] for r in rows(tmp_path / n)] for n in ("adamw", "micro"))
    assert b == pytest.approx(a, rel=1e-5)
