"""Fault injection, a testing aid: ``SEQTRAIN_FAULT`` makes a run fail on purpose.

A comma-separated list of ``ACTION@STEP[:rRANK]`` (rank 0 when omitted; ``:r*`` for all ranks):

- ``usr1@5`` / ``term@5``: the process sends itself SIGUSR1 / SIGTERM after step 5
  (exercises the save-and-stop path that Slurm preemption takes);
- ``kill@5:r1``: rank 1 dies with SIGKILL after step 5 (a node failure; no cleanup runs);
- ``nan@5`` / ``nan@5-9``: the model's output is NaN in step 5 (steps 5 to 9) on that rank, so
  loss and gradients are non-finite (exercises the skip-and-stop guard of ``trainer/engine/nonfinite.py``);
- ``spike@12-14``: the batches of data steps 12 to 14 (counted from 1, as ``train.skip_data_steps``
  counts them) are bad: their loss, and so their gradients, are ``SPIKE_SCALE`` times too large
  on that rank. Keyed by the data, not the loop step: a run that skips those data steps never
  meets them, and the fault has no once-per-run marker (bad data stays bad on a resume);
- ``hang@5:r1``: rank 1 stops making progress before step 5 (sleeps for ever; the others then
  wait in the step's collectives), which the hang watchdog (``trainer/callbacks/watchdog.py``) must catch;
- ``slowsave@4``: an asynchronous save at step 4 stalls before writing (an hour), so that a
  later ``kill`` lands while it is in flight;
- ``slowstep@3``: step 3 is slow but moving: every linear layer's forward sleeps
  ``SLOW_LINEAR_S`` first (the watchdog must not take it for a hang).

Each fault fires once per run directory (a marker file there records it), so a restarted job
that passes step 5 again keeps going.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from trainer.checkpoint import async_writer
from trainer.errors import ConfigError
from trainer.loop import Callback, Trainer

ENV = "SEQTRAIN_FAULT"
ACTIONS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "kill": signal.SIGKILL, "nan": None, "hang": None,
           "slowsave": None, "slowstep": None, "spike": None}
SLOW_LINEAR_S = 0.3
SPIKE_SCALE = 100.0
_SPEC = re.compile(r"^(?P<action>\w+)@(?P<step>\d+)(?:-(?P<end>\d+))?(?::r(?P<rank>\d+|\*))?$")


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: int | None  # None: every rank
    end: int | None = None  # nan: the last poisoned step (None: just ``step``)

    @property
    def marker(self) -> str:
        return f".fault-{self.action}-{self.step}-{'all' if self.rank is None else self.rank}"


def parse(spec: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _SPEC.match(part)
        if not m or m["action"] not in ACTIONS:
            raise ConfigError(
                f"{ENV}={spec!r}: {part!r} is not ACTION@STEP[:rRANK] with ACTION one of "
                f"{', '.join(ACTIONS)} (e.g. kill@5:r1, nan@3-6)"
            )
        rank = None if m["rank"] == "*" else int(m["rank"] or 0)
        end = int(m["end"]) if m["end"] else None
        if end is not None and (m["action"] not in ("nan", "spike") or end < int(m["step"])):
            raise ConfigError(f"{ENV}={spec!r}: {part!r}: a step range STEP-END (END ≥ STEP) is for nan and "
                              "spike only")
        faults.append(Fault(m["action"], int(m["step"]), rank, end))
    return faults


class FaultInjection(Callback):
    def __init__(self, faults: list[Fault], run_dir: Path) -> None:
        self.faults, self.run_dir = faults, run_dir
        self._poison: float | None = None  # the factor this step's output is scaled by
        self._slow = False

    def on_train_start(self, trainer: Trainer) -> None:
        if any(f.action in ("nan", "spike") for f in self.faults):
            def hook(module, args, out):
                if self._poison is None:
                    return out
                if isinstance(out, tuple):
                    return (out[0] * self._poison, *out[1:])
                return out * self._poison

            # The root module: the loss (or, under a pipeline, each stage's output) turns NaN.
            trainer.module.model.register_forward_hook(hook)
        if any(f.action == "slowstep" for f in self.faults):
            def slow(module, args):
                if self._slow:
                    time.sleep(SLOW_LINEAR_S)

            for m in trainer.module.model.modules():
                if isinstance(m, nn.Linear):
                    m.register_forward_pre_hook(slow)

    def _fires(self, f: Fault, trainer: Trainer, step: int) -> bool:
        """Whether ``f`` fires at ``step`` on this rank (once per run directory)."""
        if not (f.step <= step <= (f.end or f.step)) or f.rank not in (None, trainer.dims.rank):
            return False
        marker = self.run_dir / f"{f.marker}-{step}-rank{trainer.dims.rank}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def on_step_start(self, trainer: Trainer) -> None:
        data_step = trainer.data_index(trainer.step) + 1
        bad = any(f.step <= data_step <= (f.end or f.step) and f.rank in (None, trainer.dims.rank)
                  for f in self.faults if f.action == "spike")
        nan = any(self._fires(f, trainer, trainer.step + 1) for f in self.faults if f.action == "nan")
        self._poison = float("nan") if nan else SPIKE_SCALE if bad else None
        self._slow = any(self._fires(f, trainer, trainer.step + 1) for f in self.faults if f.action == "slowstep")
        if any(self._fires(f, trainer, trainer.step + 1) for f in self.faults if f.action == "hang"):
            while True:  # a stuck rank: only the watchdog (another thread) ends this process
                time.sleep(3600)

    @classmethod
    def from_env(cls, run_dir: Path) -> FaultInjection | None:
        spec = os.environ.get(ENV, "")
        return cls(parse(spec), run_dir) if spec else None

    def on_step_end(self, trainer: Trainer) -> None:
        self._poison = None
        if any(self._fires(f, trainer, trainer.step) for f in self.faults if f.action == "slowsave"):
            async_writer.stall_next_write(3600.0)
        for f in self.faults:
            if ACTIONS[f.action] is not None and self._fires(f, trainer, trainer.step):
                os.kill(os.getpid(), ACTIONS[f.action])
