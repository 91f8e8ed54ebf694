"""Device peak FLOP/s for MFU: a table of known GPUs, a short matmul probe on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from functools import cache
from pathlib import Path

import torch

# Dense peaks (TFLOP/s) from the vendors' data sheets: (bf16/fp16 tensor, fp32), without
# sparsity. "H100" is the SXM part (the planner's default).
GPU_PEAKS_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0),
    "H200 NVL": (835.0, 60.0),
    "GH200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "A100": (312.0, 19.5),
    "A10G": (125.0, 31.2),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
    "V100 PCIe": (112.0, 14.0),
}

DEVICE_NAMES: dict[str, str] = {
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA GH200 144G HBM3e": "GH200",
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H100": "H100",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A10G": "A10G",
    "NVIDIA L40S": "L40S",
    "NVIDIA L4": "L4",
    "Tesla V100-SXM2-16GB": "V100",
    "Tesla V100-SXM2-32GB": "V100",
    "Tesla V100-PCIE-16GB": "V100 PCIe",
    "Tesla V100-PCIE-32GB": "V100 PCIe",
}
"""``torch.cuda.get_device_name`` ► the table's part, by exact name: a substring would give an
H100 PCIe or NVL the SXM part's peak. A name not here is probed (``matmul_peak``)."""

PROBE_N = {"cuda": 8192}
"""Largest probe sizes: what reaches a device's matmul peak (1024³ leaves a GPU's tensor cores
idle between launches); 1024 elsewhere."""
PROBE_MIN_S = 0.01
"""A probe's product takes at least this long, or has the largest size: long enough to time and
to reach the peak."""


def known_gpu(name: str) -> tuple[float, float] | None:
    """A GPU's (16-bit, fp32) data-sheet peaks in TFLOP/s by its exact device name."""
    part = DEVICE_NAMES.get(name.strip())
    return GPU_PEAKS_TFLOPS[part] if part else None


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)  # timing boundary of the probe
    t0 = time.perf_counter()
    a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return time.perf_counter() - t0


@cache
def matmul_peak(device: torch.device | None = None, precision: str = "fp32", n: int | None = None,
                reps: int = 5) -> float:
    """Best achieved FLOP/s of an n×n matmul in the training precision on this device with this
    process's threads. On CPUs with bf16 dot-product instructions (AVX512-BF16, AMX) a bf16
    matmul runs about twice as fast as fp32, so bf16 MFU needs its own probe; on CPUs without
    them bf16 runs at a small fraction of fp32, so the size grows from 128 only while one product
    takes under ``PROBE_MIN_S`` (a 1024³ bf16 product alone took seconds there), up to ``n``."""
    device = device or torch.device("cpu")
    largest = n or PROBE_N.get(device.type, 1024)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    size = min(128, largest)
    # A forked random stream: the size depends on timing, and a run's random numbers must not.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" and torch.cuda.is_available() else []):
        while True:
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            # Also the warm-up of this size: thread pool start, page faults, kernel selection.
            if _timed_matmul(a, b) >= PROBE_MIN_S or size >= largest:
                break
            size = min(2 * size, largest)
    return 2 * size**3 / min(_timed_matmul(a, b) for _ in range(reps))


def _known_gpu_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    peaks = known_gpu(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    return (peaks[0] if precision in ("bf16", "fp16") else peaks[1]) * 1e12


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []) if line.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def _machine_key(device: torch.device, precision: str) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{what}|{torch.get_num_threads()} threads|{precision}|torch {torch.__version__}"


def _cache_file() -> Path:
    return Path(os.environ.get("SEQTRAIN_CACHE") or "~/.cache/seqtrain").expanduser() / "peak_flops.json"


def measured_peak(device: torch.device, precision: str, fresh: bool = False) -> float:
    """The best matmul rate this machine has shown in this precision: a probe now (``fresh``:
    not this process's earlier one), or a higher figure cached from earlier runs. A probe that
    shares the cores with another job reads low; keeping the best keeps MFU honest."""
    probe = matmul_peak.__wrapped__(device, precision, reps=10) if fresh else matmul_peak(device, precision)
    f, key = _cache_file(), _machine_key(device, precision)
    try:
        cached = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    best = max(probe, float(cached.get(key, 0.0)))
    if best > cached.get(key, 0.0):
        with contextlib.suppress(OSError):  # a read-only home: the figure is only not kept
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**cached, key: best}, indent=1))
            os.replace(tmp, f)
    return best


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device for MFU: the config's override, a known GPU's data-sheet
    figure, else a measurement (CPUs, unknown GPUs: a measured figure beats a made-up one)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    return _known_gpu_peak(device, precision) or measured_peak(device, precision)


class PeakFlops:
    """One device's peak for MFU, never below what training itself achieves: a measured peak
    is measured again when training beats it (the start-up probe may have run beside another
    job), and a figure still below the achieved rate gives way to it, with a warning once. MFU
    is therefore never above 100 %."""

    def __init__(self, device: torch.device, precision: str, override_tflops: float | None = None) -> None:
        self.device, self.precision = device, precision
        self.value = peak_flops(device, precision, override_tflops)
        self.measured = override_tflops is None and _known_gpu_peak(device, precision) is None
        self.warned = False

    def mfu(self, achieved_flops: float) -> float:
        """Model FLOPs utilisation of one device achieving ``achieved_flops`` FLOP/s."""
        if achieved_flops > self.value and self.measured:
            self.value = max(self.value, measured_peak(self.device, self.precision, fresh=True))
        if achieved_flops > self.value:
            if not self.warned:
                print(f"warning: training reaches {achieved_flops / 1e12:.3g} TFLOP/s per device, above the "
                      f"peak figure {self.value / 1e12:.3g}; MFU now uses the achieved rate "
                      "(set train.peak_tflops to the device's real peak)", file=sys.stderr, flush=True)
                self.warned = True
            self.value = achieved_flops
        return achieved_flops / self.value
