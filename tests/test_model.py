"""The model wrapper: chunked loss equals the plain one; FLOP counting on the published shape."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tests.harness import REPO, rows, tiny_run
from train.config import ModelConfig
from train.model import TokenLoss, build_model, hf_config, matmul_params

FAMILY_SHAPES = ["llama_tiny", "mistral_tiny", "olmo2_tiny", "gemma_tiny", "gpt2_tiny"]


def shape(name: str, **changes) -> ModelConfig:
    """A conf/model/ shape, with `changes`."""
    return ModelConfig(
        **{**yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()), **changes}
    )


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
        lm = AutoModelForCausalLM.from_config(hf_config(ModelConfig(**values)))
    # The published parameter count of Qwen2.5-0.5B (tied embeddings: the head is the table).
    assert matmul_params(lm) == ModelConfig(**values).matmul_params == 494_032_768
    assert ModelConfig(**values).flops_per_token(2048) == 6 * 494_032_768 + 12 * 24 * 896 * 2048


def test_untied_head_counts_once_and_the_lookup_not_at_all():
    cfg = ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
    cfg.tie_word_embeddings = False
    lm = build_model(cfg, seed=0)
    total = sum(p.numel() for p in lm.parameters())
    assert matmul_params(lm) == total - 100 * 16 == cfg.matmul_params
    cfg.tie_word_embeddings = True  # the shape's count is the same, and so is the built model's
    assert matmul_params(build_model(cfg, seed=0)) == cfg.matmul_params


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_every_family_s_flops_count_is_the_built_model_s(name, tied):
    """The shape's count (no torch: the dry run's) against the built model's, by module type; the
    family's own biases switched on where its config has the key."""
    options = {"attention_bias": True} if name.split("_")[0] in ("llama", "olmo2", "gemma") else {}
    if name == "llama_tiny":
        options["mlp_bias"] = True
    for opts in ({}, options):
        cfg = shape(name, tie_word_embeddings=tied, options=opts)
        lm = build_model(cfg, seed=0)
        assert lm.config.model_type == cfg.arch
        assert matmul_params(lm) == cfg.matmul_params, opts
        heads = cfg.num_heads * cfg.head_width
        assert cfg.flops_per_token(128) == 6 * cfg.matmul_params + 12 * cfg.num_layers * heads * 128


@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_every_family_s_chunked_and_fused_losses_equal_the_full_one(name):
    """The loss heads through `get_decoder` / `get_output_embeddings`, on SDPA without masks
    (CAUSAL_SDPA): the full, chunked (recomputed) and fused (gradients in the forward) losses over
    7-token chunks against each other and the loss of the model's own logits under eager
    attention with the causal masks transformers builds, in fp32."""
    cfg = shape(name, vocab_size=300)
    window = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk, kernel in ((0, "chunked"), (7, "chunked"), (7, "fused")):
        lm = build_model(cfg, seed=0)
        loss = TokenLoss(lm, chunk, kernel)(window)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lm.parameters()]))
    lm = build_model(cfg, seed=0, attn_implementation="eager")  # with the masks transformers builds
    assert lm.config._attn_implementation == "eager"
    logits = lm(input_ids=window[:, :-1]).logits
    own = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
    full, g_full = results[0]
    assert full.item() == pytest.approx(own.item(), rel=1e-6)
    for value, grads in results[1:]:
        assert value.item() == pytest.approx(full.item(), rel=1e-6)
        for a, b in zip(g_full, grads, strict=True):
            assert (a - b).norm() <= 1e-5 * a.norm() + 1e-12


@pytest.mark.parametrize("name", ["tiny", *FAMILY_SHAPES])
def test_a_config_json_is_read_into_the_shape_that_builds_its_config(name, tmp_path):
    """`model.hf_config`: the config.json save_pretrained writes, read without transformers into a
    shape (and the family's other keys), builds the same config and counts the same FLOPs."""
    options = {"attention_bias": True} if name.split("_")[0] in ("llama", "olmo2", "gemma") else {}
    lm = build_model(shape(name, options=options), seed=0)
    lm.config.save_pretrained(tmp_path)
    read = ModelConfig(hf_config=str(tmp_path)).resolved()
    assert read.arch == lm.config.model_type and read.matmul_params == matmul_params(lm)
    ignored = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache"}

    def keys(config):  # noqa: ANN001
        return {k: v for k, v in config.to_dict().items() if k not in ignored}

    assert keys(hf_config(read)) == keys(lm.config)


def test_a_family_the_trainer_cannot_serve_is_refused_naming_it():
    assert "an encoder-decoder" in ModelConfig(arch="t5").problems()[0]
    assert "not a family this trainer serves" in ModelConfig(arch="mamba").problems()[0]
    assert "dropout" in ModelConfig(arch="llama", options={"attention_dropout": 0.1}).problems()[0]
    with pytest.raises(ValueError, match="model.arch='t5' is an encoder-decoder"):
        build_model(ModelConfig(arch="t5"), 0)


@pytest.mark.scale
def test_the_0_5b_model_trains_two_steps_on_cpu_and_its_checkpoint_round_trips(prepared_data, tmp_path):
    """The production shape through the real trainer (`train(cfg)`, chunked loss, 16-token
    sequences, one sequence a step): finite losses, the published parameter count, and the final
    checkpoint restoring the same weights and Adam state into a fresh model."""
    from train.checkpoint import load_latest_checkpoint
    from train.data import load_split, validation_windows
    from train.loop import train

    values = yaml.safe_load((REPO / "conf" / "model" / "qwen2_5_0_5b.yaml").read_text())
    cfg = tiny_run(
        prepared_data,
        tmp_path / "run",
        model=ModelConfig(**values),
        batch_size=1,
        token_budget=2 * 16,
        seq_len=16,
        loss_chunk_tokens=8,
        val_samples=2,
        keep_checkpoints=1,
        noise_probe_every=0,
    )
    train(cfg)
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    state = load_latest_checkpoint(cfg.run_dir)
    assert state is not None and state["final"] and state["step"] == 2
    fresh = build_model(cfg.model, seed=cfg.trainer.init_seed)
    assert matmul_params(fresh) == 494_032_768
    start = fresh.model.norm.weight.clone()
    fresh.load_state_dict(state["model"])
    assert not torch.equal(fresh.model.norm.weight, start)  # two Adam steps moved it
    # The restored weights are the ones the run evaluated last: its logged final validation loss.
    windows = torch.from_numpy(validation_windows(load_split(cfg.data_dir, "validation"), 16, 2))
    with torch.no_grad():
        val = TokenLoss(fresh, 8).per_sequence(windows).sum().item() / (2 * 16)
    assert val == pytest.approx(rows(tmp_path / "run", "val_loss")[-1]["val_loss"], rel=1e-6)
    moments = state["optimizer"]["state"]
    assert len(moments) == sum(1 for _ in fresh.parameters()) and all(
        s["step"] == 2 for s in moments.values()
    )


def test_the_built_model_applies_the_configured_rope_base(monkeypatch):
    """transformers 4.x ignores `rope_parameters`: the model would train with base 10 000."""
    import train.model as model_module
    from train.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    inv_freq = model_module.build_model(cfg, 0).model.rotary_emb.inv_freq.double()
    half = len(inv_freq)  # frequencies base^(-k/half), k < half
    assert inv_freq[1] ** -half == pytest.approx(cfg.rope_theta, rel=1e-4)
    build = model_module.hf_config

    def ignoring_rope(*args, **kwargs):  # type: ignore[no-untyped-def]
        config = build(*args, **kwargs)
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}  # as 4.x would leave it
        return config

    monkeypatch.setattr(model_module, "hf_config", ignoring_rope)
    with pytest.raises(RuntimeError, match="RoPE base is 10000, not model.rope_theta=1e"):
        model_module.build_model(cfg, 0)
