"""Device peak FLOP/s for MFU: a table of known GPUs, a short matmul probe on CPU."""

from __future__ import annotations

import time
from functools import cache

import torch

# Dense peaks (TFLOP/s) from the vendors' data sheets (SXM parts): (bf16/fp16 tensor, fp32).
GPU_PEAKS_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A10G": (125.0, 31.2),
    "L40S": (362.0, 91.6),
    "V100": (125.0, 15.7),
}


@cache
def cpu_matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """Best achieved fp32 FLOP/s of an n×n matmul with this process's threads (about 0.1 s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool start and page faults
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for MFU."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, fp32) in GPU_PEAKS_TFLOPS.items():
            if key in name:
                return (half if precision in ("bf16", "fp16") else fp32) * 1e12
        # Unknown GPU: a probe is better than a made-up number.
    return cpu_matmul_peak()
