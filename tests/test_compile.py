"""Regional compile (`trainer.compile`): each decoder layer compiled in place, SDPA run without
masks (CAUSAL_SDPA), so it keeps `is_causal=True` and grouped K/V heads (flash attention on a
GPU); and the compiled trainer's losses against eager ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import rows, tiny_run
from train.config import ModelConfig
from train.model import CAUSAL_SDPA, TokenLoss, build_model

SDPA = torch._C._nn.scaled_dot_product_attention


class SdpaCalls:
    """A torch.compile backend that records the arguments of every SDPA call in the graphs it is
    given (what the compiled region will run) and runs them as traced."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (
                SDPA,
                torch.nn.functional.scaled_dot_product_attention,
            ):
                names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
                args = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
                meta = [
                    a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a for a in node.args[:3]
                ]
                args["heads"] = [m.shape[1] for m in meta]
                args["attn_mask"] = args.get("attn_mask")
                self.calls.append(args)
        return gm.forward


def _lm() -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    return build_model(cfg, seed=0)


def test_compiled_layers_call_sdpa_causal_with_grouped_heads_and_no_mask():
    torch._dynamo.reset()
    window = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = TokenLoss(_lm(), 8, "fused")
    recorder = SdpaCalls()
    loss.compile_regions(backend=recorder)
    compiled = loss(window)
    assert recorder.calls, "no SDPA call in the compiled layers"
    for call in recorder.calls:
        assert call["is_causal"] is True and call["attn_mask"] is None
        assert call.get("enable_gqa") is True and call["heads"] == [4, 2, 2]  # K/V not expanded
    # and the compiled regions compute the eager loss
    assert compiled.item() == pytest.approx(TokenLoss(_lm(), 8, "fused")(window).item(), rel=1e-6)


def test_whole_model_compile_traces_a_mask_under_transformers_sdpa_and_none_under_causal_sdpa():
    """Why the model runs SDPA as CAUSAL_SDPA (train/model.py): compiling the model as transformers
    runs its own `sdpa` traces an explicit (B, 1, T, T) mask, SDPA gets `is_causal=False` and K/V
    repeated to every head, and flash attention cannot run; under CAUSAL_SDPA transformers builds
    no mask, so even the whole model compiled calls SDPA causal with grouped heads. (If a
    transformers release changes the first, this test says the reason is gone.)"""
    window = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    for kernel in ("sdpa", CAUSAL_SDPA):
        torch._dynamo.reset()
        lm = _lm()
        lm.config._attn_implementation = kernel
        recorder = SdpaCalls()
        torch.compile(lambda w, lm=lm: lm(input_ids=w).logits, backend=recorder)(window)
        assert recorder.calls
        for call in recorder.calls:
            if kernel == "sdpa":
                assert call["is_causal"] is False and call["attn_mask"] is not None
                assert call["heads"] == [4, 4, 4] and not call.get("enable_gqa")
            else:
                assert call["is_causal"] is True and call["attn_mask"] is None
                assert call.get("enable_gqa") is True and call["heads"] == [4, 2, 2]


@pytest.mark.slow
def test_compiled_trainer_logs_the_eager_losses(prepared_data, tmp_path):
    """20 steps through `train(cfg)` with inductor on the CPU (the layers and the fused loss's
    softmax compiled): every logged loss within 1e-3 relative of eager (fused kernels reorder fp32
    sums; 1e-3 is the tolerance gpu_check holds compile to on a GPU)."""
    from train.loop import train

    torch._dynamo.reset()
    budget = 8 * 32 * 20
    logged = {}
    for compiled in (False, True):
        run_dir = tmp_path / str(compiled)
        cfg = tiny_run(
            prepared_data,
            run_dir,
            token_budget=budget,
            compile=compiled,
            loss_kernel="fused",
            loss_chunk_tokens=64,
        )
        train(cfg)
        logged[compiled] = [r["loss"] for r in rows(run_dir)]
    assert len(logged[True]) == 20
    assert logged[True] == pytest.approx(logged[False], rel=1e-3)
