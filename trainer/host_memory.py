"""Host allocator tuning for CPU training: keep freed memory in the process.

glibc's malloc hands every large block (above a threshold that adapts up to 32 MiB) to
``mmap`` and gives freed memory at the heap's top back to the kernel. A training step allocates
and frees the same activations every step, so each step faults the same pages in again
(thousands of page faults per step, docs/benchmarks.md). Raising the mmap threshold to its
maximum and the trim threshold out of reach makes the allocator reuse those pages instead, at
the same peak RSS. The same idea as the tcmalloc/jemalloc ``LD_PRELOAD`` of PyTorch's CPU launcher
(``torch.backends.xeon.run_cpu``), without a second allocator to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

import torch

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (4 MiB * sizeof(long))


def configure(setting: str, device: torch.device) -> bool:
    """Apply ``train.host_allocator`` for a process training on ``device``: only CPU training
    retains (on a GPU the host allocates little per step). Call it before the model and the
    first batches are allocated. True where memory is now retained."""
    return device.type == "cpu" and setting == "retain" and retain_freed_memory()


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; False where libc is not glibc."""
    try:
        mallopt = _libc().mallopt
    except AttributeError:  # no glibc: not Linux, or musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a fixed mmap threshold also stops its adaptive adjustment.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, 2**30)
                and mallopt(M_TOP_PAD, 64 * 2**20))


@functools.cache
def _libc():
    """glibc where the platform has it (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the kernel (glibc's ``malloc_trim``; a no-op
    elsewhere). Sharded construction calls it after each whole parameter it made and dropped:
    without it those blocks, interleaved with the kept slices, stay resident and a rank's
    resident set grows towards the whole model it never holds."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def available_bytes() -> tuple[int, str]:
    """(bytes this job may still allocate on the host, where that figure comes from): the
    cgroup's limit less its usage where a limit is set (a Slurm job, a container), else the
    kernel's ``MemAvailable``; the smaller of the two when both apply."""
    figures = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append((int(line.split()[1]) * 1024, "MemAvailable"))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or v1's huge number: no limit
            figures.append((int(limit) - usage, "the cgroup's memory limit"))
        break
    return min(figures) if figures else (2**62, "unknown")
