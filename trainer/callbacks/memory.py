"""Memory accounting of every run: ``memory.json`` in the run directory, one entry per rank.

``baseline_mb`` is taken after imports and the process group, before data and model exist;
``init_peak_mb`` is the peak while the data and this rank's part of the model are built (what
sharded construction bounds: a rank never holds the whole model); ``engine_peak_mb`` the peak
while the engine sets up the optimizer's states and ZeRO's partitions; ``train_peak_mb`` the
peak over the training loop. On a GPU: memory allocated by torch on the device, and beside each
peak (``*_reserved_mb``) the peak of what its caching allocator reserved from the driver, which
is what the device runs out of (fragmentation and cached blocks included; peaks reset between
phases); on a CPU: the process's resident set (its high-water mark, reset between phases through
``/proc/self/clear_refs`` where Linux allows it, else the process's peak so far).
"""

from __future__ import annotations

import contextlib
import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.loop import Callback, Trainer

FILE = "memory.json"


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _status_mb("VmRSS")
    return rss if rss is not None else peak_mb(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reserved_peak_mb(device: torch.device) -> float | None:
    """The caching allocator's peak reservation on a GPU (``None`` on CPUs: RSS is the figure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def phase_peaks(device: torch.device, phase: str) -> dict[str, float]:
    """This phase's peaks as ``memory.json`` keys: ``{phase}_peak_mb`` and, on GPUs,
    ``{phase}_peak_reserved_mb``."""
    out = {f"{phase}_peak_mb": round(peak_mb(device), 1)}
    reserved = reserved_peak_mb(device)
    if reserved is not None:
        out[f"{phase}_peak_reserved_mb"] = round(reserved, 1)
    return out


def reset_peak(device: torch.device) -> None:
    """Start a new phase: the next ``peak_mb`` covers only what follows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Resets VmHWM to the current RSS; elsewhere (not Linux, not allowed) the peak stays the
    # process's peak so far.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class MemoryReport(Callback):
    """Writes ``memory.json`` at the end of training (a collective: every rank's entry is
    gathered to rank 0); keeps the largest training peak for the final summary line."""

    def __init__(self, run_dir: Path, device: torch.device, baseline_mb: float,
                 peaks: dict[str, float]) -> None:
        """``peaks``: ``phase_peaks`` of the init and engine phases."""
        self.path, self.device = run_dir / FILE, device
        self.entry = {"baseline_mb": round(baseline_mb, 1), **peaks}
        self.max_train_peak_mb: float | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        reset_peak(self.device)

    def on_train_end(self, trainer: Trainer) -> None:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu (resident set)"
        entry = {"rank": trainer.dims.rank, **self.entry, **phase_peaks(self.device, "train"), "device": name}
        entries = [entry]
        if dist.is_initialized() and dist.get_world_size() > 1:
            entries = [None] * dist.get_world_size()
            dist.all_gather_object(entries, entry)  # collective
        self.max_train_peak_mb = max(e["train_peak_mb"] for e in entries)
        if trainer.is_rank0:
            self.path.write_text(json.dumps(sorted(entries, key=lambda e: e["rank"]), indent=1))
