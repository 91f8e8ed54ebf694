"""Time to the first optimizer step, and where it goes: the part every restart, every scaling
point and every array task pays before training. Laps are taken from the process's start."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks after boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Laps of the start-up, each named by what it covered."""

    def __init__(self) -> None:
        age = process_age_s()
        self.origin = time.perf_counter() - (age if age is not None else 0.0)
        self.last = self.origin
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.origin

    def metrics(self) -> dict[str, float]:
        """``time_to_first_step_s`` and one ``startup_<part>_s`` per lap (flat: MLflow metrics)."""
        return {"time_to_first_step_s": round(self.total(), 3),
                **{f"startup_{k}_s": round(v, 3) for k, v in self.laps.items()}}

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.laps.items())
        # The total as ``metrics`` rounds it: formatting the raw value could round the other way
        # (2.61495 prints 2.61 while the row's 2.615 prints 2.62).
        return f"first step {round(self.total(), 3):.2f} s after the process started ({parts})"
