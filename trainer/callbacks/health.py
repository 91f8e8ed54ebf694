"""Loss spikes: seen at the logging cadence, logged, and optionally undone by rewinding to the
last checkpoint from before them and skipping the data steps that caused them (PaLM, Chowdhery
et al. 2022, section 5.1: restart ~100 steps before the spike and skip 200-500 batches).

Each step's mean loss stays on the device until the logging cadence, when the step's row is read
anyway: one all-reduce of the window's losses and one read, no host sync in between. Every rank
sees the same reduced losses, so every rank takes the same decision and rewinds collectively.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.callbacks.checkpointing import Checkpoint
from trainer.loop import Callback, Trainer

SPREAD_PER_MAD = 1.4826
"""The median absolute deviation times this estimates a normal distribution's σ."""
MIN_SPREAD = 1e-3
"""The spread is at least this fraction of the median: a flat loss still has a margin above it."""
SPIKES_FILE = "spikes.jsonl"


@dataclass
class Spike:
    first: int
    """First high step (loop steps from 1)."""
    last: int
    """Last high step read so far."""
    median: float
    threshold: float
    peak: float


class SpikeDetector:
    """Host-side rule over (step, loss) pairs in order: a loss above median + factor × spread of
    the last ``window`` normal losses is high; ``steps`` high in a row are a spike, reported once
    (with the run's end as far as it has been read). High losses never enter the window, so a long
    spike does not become the new normal. Non-finite losses are the non-finite guard's business."""

    def __init__(self, window: int, factor: float, steps: int) -> None:
        self.normal: deque[float] = deque(maxlen=window)
        self.factor, self.steps = factor, steps
        self.run: list[tuple[int, float]] = []
        self.reported = False
        self.median = self.threshold = math.nan

    def _threshold(self) -> float | None:
        if len(self.normal) < self.normal.maxlen:
            return None
        median = statistics.median(self.normal)
        mad = statistics.median(abs(x - median) for x in self.normal)
        self.median = median
        self.threshold = median + self.factor * max(SPREAD_PER_MAD * mad, MIN_SPREAD * abs(median))
        return self.threshold

    def feed(self, losses: list[tuple[int, float]]) -> list[Spike]:
        spikes: list[Spike] = []
        for step, loss in losses:
            if not math.isfinite(loss):
                continue
            threshold = self._threshold()
            if threshold is not None and loss > threshold:
                self.run.append((step, loss))
                continue
            self._close(spikes)
            self.run, self.reported = [], False
            self.normal.append(loss)
        self._close(spikes)
        return spikes

    def _close(self, spikes: list[Spike]) -> None:
        if len(self.run) >= self.steps and not self.reported:
            spikes.append(Spike(self.run[0][0], self.run[-1][0], self.median, self.threshold,
                                max(v for _, v in self.run)))
            self.reported = True

    def state_dict(self) -> dict[str, Any]:
        return {"normal": list(self.normal), "run": [list(r) for r in self.run], "reported": self.reported,
                "median": self.median, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normal.clear()
        self.normal.extend(state["normal"])
        self.run = [(int(s), float(v)) for s, v in state["run"]]
        self.reported, self.median, self.threshold = state["reported"], state["median"], state["threshold"]


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
    """Sorted steps as inclusive (first, last) runs."""
    out: list[tuple[int, int]] = []
    for s in steps:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


class LossSpikes(Callback):
    """``train.on_spike``: log spikes, or rewind and skip them. Comes before ``Checkpoint`` in the
    callback list, so a rewind at a saving step happens before that step would be saved."""

    def __init__(self, run_dir: Path, checkpointer: Checkpoint) -> None:
        self.path = run_dir / SPIKES_FILE
        self.checkpointer = checkpointer
        self.pending: list[torch.Tensor] = []
        self.detector: SpikeDetector | None = None
        self.restored: dict[str, Any] | None = None
        self.rewinds = 0
        """Rewinds this run directory has recorded (``train.spike_max_rewinds`` bounds them)."""

    def on_load(self, trainer: Trainer) -> None:
        """Replay the rewinds this run directory has recorded: their skipped data steps apply
        before the resume picks its checkpoint's step."""
        if not self.path.is_file():
            return
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if record.get("rewound_to") is not None:
                trainer.skips += [tuple(r) for r in record["skipped_data_steps"]]
                self.rewinds += 1

    def on_train_start(self, trainer: Trainer) -> None:
        t = trainer.cfg.train
        self.dims, self.device = trainer.dims, trainer.module.device
        self.detector = SpikeDetector(t.spike_window, t.spike_factor, t.spike_steps)
        if self.restored is not None:
            self.load_state_dict(self.restored)

    def state_dict(self) -> dict[str, Any] | None:
        """The detector's window and high run, and the step losses not read yet: a resumed run
        sees the spikes the uninterrupted one sees. With losses pending this is a collective
        (every rank saves)."""
        if self.detector is None:
            return None
        pending = self.dims.dp_mean(torch.stack(self.pending)).tolist() if self.pending else []
        return {"detector": self.detector.state_dict(), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """At a resume (kept until ``on_train_start`` builds the detector) or a rewind."""
        self.restored = state
        if self.detector is not None:
            self.detector.load_state_dict(state["detector"])
            self.pending = [torch.tensor(v, device=self.device) for v in state["pending"]]

    def on_step_end(self, trainer: Trainer) -> None:
        self.pending.append(trainer.last_loss.detach().float().reshape(()))
        if not trainer.at_sync_point():
            return
        # A collective and a host read, at the cadence the loop reads the step's row anyway.
        losses = trainer.dims.dp_mean(torch.stack(self.pending)).tolist()
        first = trainer.step - len(losses) + 1
        self.pending = []
        for spike in self.detector.feed(list(zip(range(first, trainer.step + 1), losses, strict=True))):
            self._act(trainer, spike)

    def _act(self, trainer: Trainer, spike: Spike) -> None:
        if trainer.cfg.train.on_spike == "rewind" and self.rewinds >= trainer.cfg.train.spike_max_rewinds:
            trainer.diverged = True
            trainer.stop(f"loss spike at steps {spike.first}-{spike.last} after "
                         f"{trainer.cfg.train.spike_max_rewinds} rewinds (train.spike_max_rewinds)")
            return
        data = _ranges([trainer.data_index(s - 1) + 1 for s in range(spike.first, spike.last + 1)])
        target = self.checkpointer.newest_before(spike.first) if trainer.cfg.train.on_spike == "rewind" else None
        record = {"seen_at": trainer.step, **asdict(spike), "data_steps": data, "rewound_to": target,
                  "skipped_data_steps": data if target is not None else []}
        if trainer.is_rank0:
            with self.path.open("a") as f:  # before the rewind: a crash after it must replay the skips
                f.write(json.dumps(record) + "\n")
            what = (f"rewinding to step {target} and skipping data steps {data}" if target is not None else
                    "no checkpoint from before it to rewind to" if trainer.cfg.train.on_spike == "rewind" else "")
            print(f"loss spike at steps {spike.first}-{spike.last} (peak {spike.peak:.4f}, median "
                  f"{spike.median:.4f}, threshold {spike.threshold:.4f}; data steps {data})"
                  f"{': ' + what if what else ''}", flush=True)
        trainer.log({"step": trainer.step, "spike_first_step": spike.first, "spike_last_step": spike.last,
                     "spike_peak_loss": spike.peak, **({"spike_rewound_to": target} if target is not None else {})})
        if target is None:
            return
        trainer.skips += data
        self.rewinds += 1
        self.checkpointer.rewind(trainer, spike.first)  # restores the detector as it was then
        trainer.restart_data()
