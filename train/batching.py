"""Batch arithmetic shared by the sweep (to refuse bad arms before queueing) and the trainer."""

from __future__ import annotations

from dataclasses import dataclass


class BatchError(ValueError):
    """A batch that cannot be split exactly over ranks and micro-batches, or a budget that does not fit."""


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # global, in sequences
    world_size: int
    micro_batch_size: int  # per rank, per forward/backward
    grad_accum: int  # micro-batches per rank per optimizer step
    steps: int  # optimizer steps to consume the token budget
    tokens_per_step: int


def plan_batches(
    batch_size: int, micro_batch_size: int, world_size: int, seq_len: int, token_budget: int
) -> BatchPlan:
    """Derive accumulation and step count, refusing anything that does not divide exactly.

    `micro_batch_size` 0 means the whole per-rank batch in one pass; a micro-batch larger than
    the per-rank batch is reduced to it (a small-batch arm needs no accumulation).
    """
    if batch_size <= 0 or world_size <= 0 or seq_len <= 0:
        raise BatchError(f"batch {batch_size}, world {world_size} and seq_len {seq_len} must be positive")
    if batch_size % world_size:
        raise BatchError(f"batch {batch_size} is not divisible by world size {world_size}")
    per_rank = batch_size // world_size
    micro = per_rank if micro_batch_size <= 0 else min(micro_batch_size, per_rank)
    if per_rank % micro:
        raise BatchError(
            f"per-rank batch {per_rank} (batch {batch_size} / world {world_size}) "
            f"is not divisible by micro-batch {micro}"
        )
    tokens_per_step = batch_size * seq_len
    if token_budget <= 0 or token_budget % tokens_per_step:
        raise BatchError(
            f"token budget {token_budget} is not a positive multiple of the step's "
            f"{tokens_per_step} tokens (batch {batch_size} x seq_len {seq_len})"
        )
    return BatchPlan(
        batch_size, world_size, micro, per_rank // micro, token_budget // tokens_per_step, tokens_per_step
    )
