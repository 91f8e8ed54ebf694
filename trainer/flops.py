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
def matmul_peak(device: torch.device | None = None, precision: str = "fp32", n: int = 1024,
                reps: int = 5) -> float:
    """Best achieved FLOP/s of an n×n matmul in the training precision on this device with this
    process's threads (about 0.1 s on a CPU). On CPUs with bf16 dot-product instructions
    (AVX512-BF16, AMX) a bf16 matmul runs about twice as fast as fp32, so bf16 MFU needs its own
    probe."""
    device = device or torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool start, page faults, kernel selection
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # timing boundary of the probe
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for MFU: the config's override, a known GPU's data-sheet
    figure, else a probe (CPUs, unknown GPUs: a measured figure beats a made-up one)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, fp32) in GPU_PEAKS_TFLOPS.items():
            if key in name:
                return (half if precision in ("bf16", "fp16") else fp32) * 1e12
    return matmul_peak(device, precision)
