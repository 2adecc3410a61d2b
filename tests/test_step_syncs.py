"""A step reads nothing back to the host: no `.item()`, `.tolist()`, truth value or blocking copy
inside `launch_step`, for every kind of step the trainer takes (the 2-rank DDP step is counted in
tests/test_trainer.py's DDP parity test). The trainer reads a step's figures one step later, and
sends the next step's samples ahead from pinned memory where there is a GPU."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from tests.harness import FAMILY_SHAPES, counting_host_reads, model_shape, optimizer_steps, tiny_run
from train.config import OptimizerConfig

STEPS = {
    "adamw, B_simple probe": dict(noise_probe_every=1),
    "accumulation": dict(micro_batch_size=2),
    "clipping": dict(grad_clip=0.5, micro_batch_size=4),
    "bf16": dict(precision="bf16"),
    "fused loss": dict(loss_kernel="fused", loss_chunk_tokens=64),
    "per-example statistics": dict(per_example_stats=True, micro_batch_size=4),
    "invariant adam": dict(optimizer=OptimizerConfig(name="invariant_adam", lr=3e-3), micro_batch_size=2),
    "micro_adam_var": dict(optimizer=OptimizerConfig(name="micro_adam_var", lr=3e-3)),
    "sign_example, weight decay": dict(
        optimizer=OptimizerConfig(name="sign_example", lr=3e-3, weight_decay=0.1)
    ),
}


# Every other family on the fused loss with per-example statistics (the most the trainer does in a
# step): their decoders would build masks and read position_ids back but for causal_sdpa
# (train/model.py); GPT-2's positions are given.
for _name in FAMILY_SHAPES:
    _kv = 2 if _name.startswith("gpt2") else 1
    STEPS[_name] = dict(
        model=model_shape(
            _name, vocab_size=320, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=_kv
        ),
        loss_kernel="fused",
        loss_chunk_tokens=64,
        per_example_stats=True,
        micro_batch_size=4,
    )


@pytest.mark.parametrize("kind", list(STEPS))
def test_a_step_reads_nothing_back_to_the_host(prepared_data, tmp_path, monkeypatch, kind):
    import train.loop as loop
    from train.distributed import init_distributed

    reads: Counter[str] = Counter()
    launch = loop.launch_step

    def counted(network: Any, state: Any, *args: Any, **kwargs: Any) -> loop.StepTensors:
        with counting_host_reads(optimizer_steps(state.optimizer)) as counts:
            queued = launch(network, state, *args, **kwargs)
        reads.update(counts)
        return queued

    cfg = tiny_run(prepared_data, tmp_path / "run", progress=False, **STEPS[kind])
    with loop.StopFlag() as stop:
        trainer = loop.Trainer(cfg, init_distributed("cpu"), stop)
        trainer.take(0, trainer.one_step(0))  # the first step makes the optimizer's state
        monkeypatch.setattr(loop, "launch_step", counted)
        results = [trainer.take(step, trainer.one_step(step)) for step in range(1, 4)]
    assert reads == Counter(), f"{kind}: host reads inside a step: {dict(reads)}"
    # ... and the figures are all there, read afterwards
    assert all(r.loss > 0 and r.grad_norm > 0 for r in results)
    if kind == "adamw, B_simple probe":
        assert all(r.noise is not None for r in results)
    if kind == "per-example statistics":
        assert all("b_simple_exact" in r.per_example or "pe_norm_mean" in r.per_example for r in results)


def test_the_counter_sees_what_a_step_must_not_do():
    """The counter is the test's instrument: reading a value, branching on a tensor, a blocking
    copy to another device and a tensor made from Python data are each counted; what waits for
    nothing is not."""
    x = torch.ones(3)
    with counting_host_reads() as counts:
        x.sum().item()
        bool(x[0] > 0)
        x.to("meta")  # a copy to another device (on a GPU: "cpu" from "cuda")
        x.to("meta", non_blocking=True)  # not counted: the copy does not wait
        torch.tensor([1.0, 2.0])
        x.to(torch.float64)  # not counted: no device
        x.to(x.device)  # not counted: no copy
    assert counts == Counter({"item": 1, "__bool__": 1, "to(device)": 1, "torch.tensor": 1})


def test_the_next_batch_goes_from_pinned_memory_without_waiting(prepared_data, tmp_path, monkeypatch):
    """Where the device is a GPU (faked: no CUDA here), `to_device` pins the rows and copies them
    with `non_blocking=True`; on a CPU it hands the rows over as they are."""
    import train.loop as loop
    from train.distributed import Placement, init_distributed

    cfg = tiny_run(prepared_data, tmp_path / "run", progress=False)
    with loop.StopFlag() as stop:
        trainer = loop.Trainer(cfg, init_distributed("cpu"), stop)
    rows = trainer.stream.rank_slice(0, 8, 0, 1)
    assert torch.equal(trainer.to_device(rows), torch.from_numpy(rows))
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", None)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append(("to", (a, kw))) or self)
    trainer.where = Placement(0, 1, torch.device("cuda", 0))
    trainer.to_device(rows)
    assert calls == [("pin", None), ("to", ((torch.device("cuda", 0),), {"non_blocking": True}))]


def test_ddp_options_follow_the_step_kind_and_the_torch_release(prepared_data, tmp_path, monkeypatch):
    """Gradients are bucket views only on plain steps (per-unit steps set `.grad` themselves), and
    buffers are not synced under whichever name this torch release gives the option (faked: a
    release before 2.13 knows only `broadcast_buffers`)."""
    import inspect

    from train.loop import ddp_options

    plain = tiny_run(prepared_data, tmp_path / "a")
    units = tiny_run(prepared_data, tmp_path / "b", optimizer=OptimizerConfig(name="invariant_adam", lr=3e-3))
    assert ddp_options(plain)["gradient_as_bucket_view"] is True
    assert ddp_options(units)["gradient_as_bucket_view"] is False
    known = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    assert ddp_options(plain)[name] is False

    def old_init(
        self: Any, module: Any, broadcast_buffers: bool = True, gradient_as_bucket_view: bool = False
    ) -> None:
        pass

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "__init__", old_init)
    assert ddp_options(plain) == {"broadcast_buffers": False, "gradient_as_bucket_view": True}
