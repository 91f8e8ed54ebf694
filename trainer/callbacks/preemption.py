"""Save and stop on SIGTERM / SIGUSR1: what Slurm (``--signal=B:USR1@T``) and torchrun send
before a job is preempted, hits its time limit or is stopped.

The handler only sets a flag. A launcher that cannot signal the training processes
themselves (a Slurm batch script whose workers sit under srun and torchrun) instead creates the
file named by ``SEQTRAIN_STOP_FILE``; every rank checks for it after each step. Ranks may
receive the signal at different steps, so the flag is all-reduced (MAX) and all ranks stop at
the same step, as Megatron's exit signal handler does; but at the loop's host sync points only
(``train.log_every`` and the last step), not after every step: a step never waits on the
host. A stop therefore comes up to ``log_every - 1`` steps after the signal: keep
``log_every`` × the step time well inside the scheduler's grace period (Slurm's
``--signal=B:USR1@T``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.loop import Callback, Trainer

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(Callback):
    def __init__(self) -> None:
        self.received: int | None = None
        stop_file = os.environ.get("SEQTRAIN_STOP_FILE")
        self.stop_file = Path(stop_file) if stop_file else None

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: Trainer) -> None:
        for s in SIGNALS:
            signal.signal(s, self._handler)

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.at_sync_point():
            return
        if self.received is None and self.stop_file is not None and self.stop_file.exists():
            self.received = signal.SIGUSR1  # the launcher's stand-in for the signal
        flag = torch.tensor([self.received or 0], device=trainer.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())  # host sync, at the logging cadence (see module docstring)
        if signum:
            trainer.stop(f"received {signal.Signals(signum).name}")

    def on_train_end(self, trainer: Trainer) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
