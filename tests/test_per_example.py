"""Per-example gradient statistics and the optimizer variants they feed (Roulet & Agarwala 2025):
exactness against a loop of per-sequence backward passes, on one process and under 2-rank DDP with
accumulation; the variants' second-moment inputs in closed form and by simulation; MicroAdam = Adam
at one sequence; the sign placements in closed form."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness import rows, run_world, tiny_run
from train.adam_variants import VariantAdam, second_moment_input
from train.batching import plan_batches
from train.config import ModelConfig, OptimizerConfig
from train.loop import Units, accumulate_gradients
from train.model import TokenLoss, build_model
from train.per_example import UnitGradients, param_group, per_example_gradients

SEQ = 16


def _tiny_loss() -> TokenLoss:
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    return TokenLoss(build_model(cfg, seed=0))


def _windows(n: int) -> torch.Tensor:
    """Counting sequences (token t + 1 follows t) from random starts, a quarter of the tokens random:
    a gradient with a clear common direction (B_simple > 0 measurable from 8 sequences)."""
    gen = torch.Generator().manual_seed(1)
    counting = (torch.randint(0, 64, (n, 1), generator=gen) + torch.arange(SEQ + 1)) % 64
    noise = torch.randint(0, 64, (n, SEQ + 1), generator=gen)
    return torch.where(torch.rand(n, SEQ + 1, generator=gen) < 0.25, noise, counting)


def _reference(loss: TokenLoss, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's mean-token gradient, one backward pass per sequence: (n, numel) rows."""
    per_sequence = []
    for w in windows:
        loss.zero_grad(set_to_none=True)
        (loss(w[None]) / SEQ).backward()
        per_sequence.append(torch.cat([p.grad.flatten() for p in loss.parameters()]))
    loss.zero_grad(set_to_none=True)
    return per_sequence


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.parametrize("micro", [1, 4])
def test_statistics_are_exact_against_a_loop_of_per_sequence_backward_passes(micro):
    """micro 4: vmap inside each micro-batch (2 of them); micro 1: every micro-batch's own backward."""
    torch.manual_seed(0)
    loss, windows = _tiny_loss(), _windows(8)
    g = torch.stack(_reference(loss, windows)).double()
    named = list(loss.named_parameters())
    params, names = [p for _, p in named], [n for n, _ in named]
    units = Units(UnitGradients(params, names, squares=True, signs=True))
    units.examples = per_example_gradients(loss, names, SEQ)
    plan = plan_batches(8, micro, 1, SEQ, 8 * SEQ)
    loss_sum, _, moments = accumulate_gradients(
        loss, windows, plan, False, contextlib.nullcontext, units=units
    )
    assert moments is not None and moments.units == 8
    mean = torch.cat([p.grad.flatten() for p in params]).double()
    assert torch.allclose(mean, g.mean(0), rtol=1e-5, atol=1e-9)
    assert torch.allclose(
        torch.cat([t.flatten() for t in moments.mean_sq]).double(), (g * g).mean(0), rtol=1e-5, atol=1e-12
    )  # noqa: E501
    assert torch.allclose(
        torch.cat([t.flatten() for t in moments.mean_sign]).double(), g.sign().mean(0), atol=1e-6
    )  # noqa: E501
    with torch.no_grad():
        assert loss_sum.item() == pytest.approx(loss(windows).item(), rel=1e-5)
    # The statistics from the definitions in train/per_example.py, in float64.
    norms = g.norm(dim=1)
    trace = 8 / 7 * ((norms**2).mean() - mean.double().norm() ** 2)
    signal = mean.double().norm() ** 2 - trace / 8
    stats = moments.statistics()
    assert _close(stats["pe_norm_mean"], norms.mean().item())
    assert _close(stats["pe_norm_std"], norms.std(unbiased=False).item())
    assert _close(stats["noise_trace_exact"], trace.item())
    assert _close(stats["grad_sq_exact"], signal.item())
    assert _close(stats["b_simple_exact"], (trace / signal).item())
    offsets = np.cumsum([0] + [p.numel() for p in params])
    for group in ("embeddings", "attention", "mlp", "norms"):
        cols = torch.cat(
            [torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if param_group(n) == group]
        )
        gk, mk = g[:, cols], g[:, cols].mean(0)
        trace_k = 8 / 7 * ((gk**2).sum(1).mean() - mk.norm() ** 2)
        assert _close(stats[f"snr_{group}"], ((mk.norm() ** 2 - trace_k / 8) / trace_k).item()), group
    assert "snr_head" not in stats  # tied embeddings: the head's gradient is the table's


def test_the_reference_implementations_example():
    """optax.experimental.microbatching.micro_grad's documented example (the paper's reference code):
    loss 0.5 (x p - t)^2 at p = 0, x = 1, targets 0, 2, 4, 6, so per-example gradients -t. Its MEAN
    accumulator with transform (g, g^2) gives -3 and 14; its per-example norms are 0, 2, 4, 6."""
    p = torch.nn.Parameter(torch.zeros(1))
    x, t = torch.ones(4, 1), torch.tensor([0.0, 2.0, 4.0, 6.0])
    per_example = torch.func.vmap(torch.func.grad(lambda w, xi, ti: 0.5 * (xi @ w - ti) ** 2), (None, 0, 0))
    units = UnitGradients([p], ["lm.mlp.p"], squares=True, signs=False)
    units.begin()
    units.add([per_example(p.detach(), x, t)])
    moments, _ = units.finish(world=1)
    assert p.grad.item() == -3.0 and moments.mean_sq[0].item() == 14.0
    assert moments.sums is not None and moments.sums[:2].tolist() == [12.0, 0 + 4 + 16 + 36]


def test_second_moment_inputs_in_closed_form():
    """On a fixed set of per-example gradients, each variant's input is its formula."""
    g = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [-1.0, 1.0, 0.5], [2.0, 4.0, 0.5]])
    u = len(g)
    mean, mean_sq = g.mean(0), (g * g).mean(0)
    var = g.var(0, unbiased=True)
    expected = {
        "micro_adam": mean_sq,
        "invariant_adam": mean_sq,
        "micro_adam_var": var,
        "micro_adam_msq": mean**2 - var / u,
    }
    for variant, want in expected.items():
        (got,) = second_moment_input(variant, [mean], [mean_sq], u)
        assert torch.allclose(got, want, atol=1e-6), variant
    assert second_moment_input("micro_adam_var", [mean], [mean_sq], u)[0][2] == 0  # no spread, no variance


def test_variance_and_mean_square_inputs_are_unbiased_by_simulation():
    """Gaussian per-example gradients g ~ N(mu, sigma^2), U = 4: over 20000 draws the mean input of
    micro_adam_var is sigma^2 and of micro_adam_msq is mu^2, while Adam's (the squared mean) is
    mu^2 + sigma^2 / U. Tolerance: 5 standard errors of each average."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, 1.0, -2.0], dtype=torch.float64)
    sigma, u, draws = 1.5, 4, 20000
    g = mu + sigma * torch.randn(draws, u, len(mu), generator=gen, dtype=torch.float64)
    mean, mean_sq = g.mean(1), (g * g).mean(1)
    for variant, truth in (("micro_adam_var", sigma**2 + 0 * mu), ("micro_adam_msq", mu**2)):
        (inputs,) = second_moment_input(variant, [mean], [mean_sq], u)
        se = inputs.std(0) / draws**0.5
        assert ((inputs.mean(0) - truth).abs() < 5 * se).all(), variant
    adam = mean**2
    assert ((adam.mean(0) - (mu**2 + sigma**2 / u)).abs() < 5 * adam.std(0) / draws**0.5).all()


def _feed(opt: VariantAdam, param: torch.nn.Parameter, grads: torch.Tensor, signs: bool = False) -> None:
    units = UnitGradients([param], ["model.layers.0.mlp.w"], squares=opt.needs_squares, signs=signs)
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
def test_two_ranks_with_accumulation_log_the_statistics_of_one_rank(prepared_data, tmp_path):
    """The same 8 sequences per step on one rank (micro 2, vmap, 4 micro-batches) or two (2 each):
    the same per-example statistics and the same losses; and the statistics leave the run AdamW's."""
    budget = 8 * 32 * 3
    kw = {"token_budget": budget, "micro_batch_size": 2, "per_example_stats": True}
    one = tiny_run(prepared_data, tmp_path / "one", **kw)
    two = tiny_run(prepared_data, tmp_path / "two", **kw)
    run_world(one, 1, tmp_path / "g1.pt")
    run_world(two, 2, tmp_path / "g2.pt")
    for rank in (0, 1):  # the units' own reduction read nothing back to the host either
        assert json.loads((tmp_path / f"g2-reads-{rank}.json").read_text()) == {"steps": 2}
    logged = [rows(Path(c.run_dir)) for c in (one, two)]
    keys = ["loss", "pe_norm_mean", "pe_norm_std", "noise_trace_exact", "grad_sq_exact", "snr_mlp"]
    for a, b in zip(*logged, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    plain = tiny_run(prepared_data, tmp_path / "plain", token_budget=budget, micro_batch_size=2)
    run_world(plain, 1, tmp_path / "g3.pt")
    assert [r["loss"] for r in rows(tmp_path / "plain")] == pytest.approx(
        [r["loss"] for r in logged[0]], rel=1e-5
    )
    assert "pe_norm_mean" not in rows(tmp_path / "plain")[0]


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
