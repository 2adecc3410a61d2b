"""`make gpu-check` without a GPU: it runs what the CPU can through the real trainer, says in one
line what it skipped and why, and writes its JSON and Markdown report."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import REPO

NEEDS_CUDA = ["cuda_fp32_vs_cpu", "cuda_bf16_vs_cpu", "cuda_fp16_scaler", "fused_vs_foreach"]
NEEDS_CUDA += ["compile_vs_eager", "invariant_adam", "throughput_0_5b"]


def test_the_gpu_check_runs_on_a_cpu_and_says_what_it_skipped(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    status = {o["name"]: o["status"] for o in report["outcomes"]}
    # what a CPU can check, checked: the chunked loss and two gloo ranks against one
    assert status["chunked_vs_full"] == status["ddp_two_ranks"] == "passed"
    figures = {o["name"]: o["figures"] for o in report["outcomes"]}
    assert figures["ddp_two_ranks"]["max_rel_diff"] <= 1e-5
    assert figures["throughput"]["rows"][0]["tokens_per_s"] > 0  # the throughput code path ran
    assert {"backward (all kernels)", "optimizer"} <= set(figures["profile"])
    for name in NEEDS_CUDA:
        assert status[name] == "skipped"
        line = next(x for x in out.stdout.splitlines() if f" {name}:" in x)
        assert line.split()[0] == "skipped" and "(needs CUDA)" in line
    assert "| chunked_vs_full | passed |" in (tmp_path / "gpu_check_cpu.md").read_text()
