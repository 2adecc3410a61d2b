"""A memory and FLOP model of one training step, from the model's shape alone (no GPU, no
weights): what a micro-batch costs before it is tried. `python -m benchmarks.step_model` prints it
for Qwen2.5-0.5B at seq 2048 in bf16, micro 4 / 8 / 16, chunked vs fused loss; `make gpu-check`
prints it next to the measured peak memory.

Bytes, per rank, mixed precision as the trainer runs it (fp32 weights, bf16 autocast):
- weights 4P, gradients 4P, Adam's two moments 8P (P: every parameter, a tied head once);
- DDP buckets: a gradient-sized 4P more, unless the gradients are views into them
  (`gradient_as_bucket_view`, train/loop.py `ddp_options`), as for plain steps;
- activations saved for backward, per token and layer (flash attention: nothing quadratic in
  the sequence), tensor by tensor as autograd saves them for a Qwen2 layer under autocast
  (tests/test_step_model.py counts them on a built model):
      each RMSNorm: its fp32 input and normalised output                       2 x 8d
      the bf16 copy of a norm's output that each projection saves (autocast
      casts it per op): q, k, v, gate, up                                      5 x 2d
      q, k, v (bf16, K/V heads grouped), the attention output and its
      contiguous copy into o_proj                                             2d + 4kv + 2d + 2d
      gate and up outputs, SiLU(gate), and SiLU(gate)·up into down_proj        4 x 2I
  = 32d + 4kv + 8I bytes, plus the final norm's 8d per token; and once per micro-batch, the
  bf16 copies of the weights autocast makes (2 bytes a matmul parameter);
- the LM head's transient, one chunk of c tokens (the whole micro-batch without chunks):
      chunked: bf16 logits 2cV, fp32 logits 4cV, log-softmax 4cV (saved), its gradient 4cV,
               then recomputed in backward: the same again at the chunk's backward
      fused:   bf16 logits 2cV, fp32 softmax 4cV (in place), its bf16 gradient 2cV
  and, with the fused loss, the gradient of the hidden states (4d per token) kept from forward.

FLOPs per step: 6·N·tokens + 12·L·d·T·tokens (PaLM's convention, as the trainer logs MFU), plus
2·tokens·V·d for the chunked loss's recomputed head matmul, which MFU does not count.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
GB = 2**30


def parameters(model: ModelConfig) -> int:
    """Every parameter: the matmul ones plus the embedding table where the head is not tied to it."""
    embedding = 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size
    return model.matmul_params + embedding


def activation_bytes_per_token(model: ModelConfig) -> int:
    """Bytes saved for backward per token, every layer and the final norm (see the docstring)."""
    d, i = model.hidden_size, model.intermediate_size
    kv = model.num_kv_heads * (d // model.num_heads)
    return model.num_layers * (32 * d + 4 * kv + 8 * i) + 8 * d


def activation_bytes(model: ModelConfig, tokens: int) -> int:
    """Everything the forward of `tokens` tokens saves for backward, the LM head aside: the
    per-token activations and autocast's bf16 copies of the decoder's weights."""
    decoder_matmul = model.matmul_params - model.vocab_size * model.hidden_size
    return activation_bytes_per_token(model) * tokens + 2 * decoder_matmul


def head_bytes(model: ModelConfig, tokens: int, kernel: str, chunk: int) -> int:
    """The LM head and loss's transient memory for `tokens` tokens, `chunk` at a time (0: all)."""
    c, v = (chunk if 0 < chunk < tokens else tokens), model.vocab_size
    if kernel == "fused":
        return (2 + 4 + 2) * c * v + 4 * model.hidden_size * tokens
    return (2 + 4 + 4 + 4) * c * v


@dataclass
class StepModel:
    micro_batch: int
    kernel: str
    weights_gb: float
    gradients_gb: float
    adam_gb: float
    ddp_buckets_gb: float
    activations_gb: float
    head_gb: float
    total_gb: float
    tflops: float  # per step, counted as MFU counts them
    recompute_tflops: float  # the chunked loss's head matmul again, not in MFU


def step_model(
    model: ModelConfig,
    seq_len: int,
    micro_batch: int,
    kernel: str,
    chunk: int,
    ddp: bool = False,
    bucket_view: bool = True,
) -> StepModel:
    p = parameters(model)
    tokens = micro_batch * seq_len
    weights, grads, adam = 4 * p, 4 * p, 8 * p
    buckets = 4 * p if ddp and not bucket_view else 0
    acts = activation_bytes(model, tokens)
    head = head_bytes(model, tokens, kernel, chunk)
    flops = model.flops_per_token(seq_len) * tokens
    recompute = 2 * tokens * model.vocab_size * model.hidden_size if kernel == "chunked" and chunk > 0 else 0
    return StepModel(
        micro_batch,
        kernel,
        weights / GB,
        grads / GB,
        adam / GB,
        buckets / GB,
        acts / GB,
        head / GB,
        (weights + grads + adam + buckets + acts + head) / GB,
        flops / 1e12,
        recompute / 1e12,
    )


def table(model: ModelConfig, seq_len: int, micros: list[int], chunk: int) -> list[StepModel]:
    return [step_model(model, seq_len, m, k, chunk) for m in micros for k in ("chunked", "fused")]


def markdown(rows: list[StepModel]) -> str:
    head = "| micro | loss | weights | grads | Adam | activations | head transient | total | TFLOP/step |"
    lines = [head + " recompute |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.micro_batch} | {r.kernel} | {r.weights_gb:.1f} GB | {r.gradients_gb:.1f} GB | "
            f"{r.adam_gb:.1f} GB | {r.activations_gb:.1f} GB | {r.head_gb:.1f} GB | {r.total_gb:.1f} GB | "
            f"{r.tflops:.0f} | {r.recompute_tflops:.1f} ({r.recompute_tflops / r.tflops:+.1%}) |"
        )
    return "\n".join(lines)


def qwen2_5_0_5b() -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / "qwen2_5_0_5b.yaml").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=8192, help="loss_chunk_tokens")
    args = ap.parse_args()
    print(f"Qwen2.5-0.5B, seq {args.seq_len}, bf16 autocast, one rank, loss chunks of {args.chunk} tokens")
    print(markdown(table(qwen2_5_0_5b(), args.seq_len, [4, 8, 16], args.chunk)))


if __name__ == "__main__":
    main()
