import pytest

from train.batching import BatchError, plan_batches


def test_accumulation_is_derived():
    plan = plan_batches(64, 8, 2, 128, 64 * 128 * 10)
    assert (plan.micro_batch_size, plan.grad_accum, plan.steps, plan.tokens_per_step) == (8, 4, 10, 8192)


def test_small_batch_needs_no_accumulation():
    plan = plan_batches(4, 8, 1, 128, 4 * 128 * 3)
    assert (plan.micro_batch_size, plan.grad_accum) == (4, 1)


@pytest.mark.parametrize(
    ("batch", "micro", "world", "budget", "message"),
    [
        (6, 0, 4, 6 * 128, "not divisible by world size 4"),
        (64, 3, 1, 64 * 128, "not divisible by micro-batch 3"),
        (64, 0, 1, 64 * 128 + 1, "not a positive multiple"),
    ],
)
def test_bad_batches_are_refused(batch, micro, world, budget, message):
    with pytest.raises(BatchError, match=message):
        plan_batches(batch, micro, world, 128, budget)
