"""Device facts for speed metrics: peak FLOP/s (for MFU) and peak memory."""

from __future__ import annotations

import resource
import sys

import torch

# Dense tensor-core peaks from the vendors' datasheets, in FLOP/s: (bf16/fp16, fp32). fp32 is the
# TF32 tensor-core rate, which PyTorch uses for fp32 matmuls only when allowed (see README).
PEAK_FLOPS = {
    "H200": (989.4e12, 494.7e12),
    "H100 NVL": (835.5e12, 417.8e12),
    "H100 PCIe": (756.0e12, 378.0e12),
    "H100": (989.4e12, 494.7e12),  # SXM
    "A100": (312.0e12, 156.0e12),
    "L40S": (362.1e12, 181.0e12),
    "A10G": (70.0e12, 35.0e12),
}


def peak_flops(device: torch.device, precision: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for `precision`; `override` (>0) wins; None where unknown (CPUs)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single) in PEAK_FLOPS.items():  # longest names first where they overlap
        if key in name:
            return single if precision == "fp32" else half
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated by PyTorch on the GPU, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux
