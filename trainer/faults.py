"""Fault injection, a testing aid: ``SEQTRAIN_FAULT`` makes a run fail on purpose.

A comma-separated list of ``ACTION@STEP[:rRANK]`` (rank 0 when omitted; ``:r*`` for all ranks):

- ``usr1@5`` / ``term@5``: the process sends itself SIGUSR1 / SIGTERM after step 5
  (exercises the save-and-stop path that Slurm preemption takes);
- ``kill@5:r1``: rank 1 dies with SIGKILL after step 5 (a node failure; no cleanup runs).

Each fault fires once per run directory (a marker file there records it), so a restarted job
that passes step 5 again keeps going.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.callbacks import Callback
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.loop import Trainer

ENV = "SEQTRAIN_FAULT"
ACTIONS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "kill": signal.SIGKILL}
_SPEC = re.compile(r"^(?P<action>\w+)@(?P<step>\d+)(?::r(?P<rank>\d+|\*))?$")


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: int | None  # None: every rank

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
                f"{', '.join(ACTIONS)} (e.g. kill@5:r1)"
            )
        rank = None if m["rank"] == "*" else int(m["rank"] or 0)
        faults.append(Fault(m["action"], int(m["step"]), rank))
    return faults


class FaultInjection(Callback):
    def __init__(self, faults: list[Fault], run_dir: Path) -> None:
        self.faults, self.run_dir = faults, run_dir

    @classmethod
    def from_env(cls, run_dir: Path) -> FaultInjection | None:
        spec = os.environ.get(ENV, "")
        return cls(parse(spec), run_dir) if spec else None

    def on_step_end(self, trainer: Trainer) -> None:
        for f in self.faults:
            if f.step != trainer.step or f.rank not in (None, trainer.dims.rank):
                continue
            marker = self.run_dir / f"{f.marker}-rank{trainer.dims.rank}"
            if marker.exists():
                continue
            marker.touch()
            os.kill(os.getpid(), ACTIONS[f.action])
