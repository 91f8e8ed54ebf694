"""Hang watchdog: a rank that stops making progress (a stuck collective, a dead NFS mount, a
deadlocked data reader) ends the job, with evidence, instead of idling until the time limit.

A daemon thread watches the loop's heartbeat (the watchdog is the last callback: its step-start
hook marks "this step's work begins", its step-end hook "this step is done"; inside a step every
module's forward and the gradients of their outputs beat, so a slow step that moves is never
taken for a hang). After
``train.hang_timeout_s`` without a beat, every rank whose interpreter still runs writes its
Python stacks (faulthandler, all threads) and last progress to ``run_dir/hang/``, waits a short
grace for the other ranks' reports, names the stuck rank, and exits with code 5, so
``torchrun --max-restarts`` or a Slurm requeue restarts the job and it resumes from the last
checkpoint.

Which rank is stuck: the others wait for it in the next collective, so they are ahead of it in
the loop; the stuck rank is the one furthest behind (step, then phase), or a rank that wrote no
report at all (dead, or stuck outside the interpreter).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from trainer.loop import Callback, Trainer

EXIT_CODE = 5
PHASES = ("train", "done")
"""Within a step: its work is under way (``train``: forward, backward, step-end hooks), or all
its hooks are done (``done``)."""


def stuck_ranks(reports: list[dict], world_size: int) -> tuple[list[int], str]:
    """(ranks named stuck, why) from the ranks' reports."""
    if world_size == 1:
        return [0], "the only rank"
    missing = sorted(set(range(world_size)) - {r["rank"] for r in reports})
    if missing:
        return missing, "wrote no report: dead, or stuck outside the Python interpreter"
    key = {r["rank"]: (r["step"], PHASES.index(r["phase"])) for r in reports}
    low = min(key.values())
    behind = sorted(r for r, k in key.items() if k == low)
    if len(behind) == len(key):
        return [], "no rank is behind the others: all wait (a collective or I/O); see the stacks"
    return behind, "behind every other rank, which wait for it"


class HangWatchdog(Callback):
    def __init__(self, run_dir: Path, timeout_s: float, rank: int, world_size: int) -> None:
        self.dir, self.timeout, self.rank, self.world = run_dir / "hang", timeout_s, rank, world_size
        self.grace = min(30.0, max(2.0, timeout_s / 2))
        self.beat = (time.monotonic(), 0, "done")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="seqtrain-watchdog")

    def on_train_start(self, trainer: Trainer) -> None:
        self.beat = (time.monotonic(), trainer.step, "done")
        self._step = trainer.step
        if not trainer.cfg.train.compile:  # hooks would break a compiled graph: it beats per step
            self._hooks = [nn.modules.module.register_module_forward_hook(self._forward_beat)]
        self.thread.start()

    def _forward_beat(self, module: nn.Module, args, out) -> None:
        """Progress inside a step: every module's forward beats (a block's recomputation too),
        and each output that autograd will differentiate beats again when its gradient arrives.
        A slow step keeps beating; a rank stuck in a collective does not. Costs a tuple store."""
        if self.beat[2] != "train":
            return
        self.beat = (time.monotonic(), self._step + 1, "train")
        if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
            out.register_hook(self._backward_beat)

    def _backward_beat(self, grad: torch.Tensor) -> None:
        self.beat = (time.monotonic(), self._step + 1, "train")

    def on_step_start(self, trainer: Trainer) -> None:
        self._step = trainer.step
        self.beat = (time.monotonic(), trainer.step + 1, "train")

    def on_step_end(self, trainer: Trainer) -> None:
        self.beat = (time.monotonic(), trainer.step, "done")

    def on_train_end(self, trainer: Trainer) -> None:
        self._stop.set()
        for h in getattr(self, "_hooks", ()):
            h.remove()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout / 5)):
            since, step, phase = self.beat
            idle = time.monotonic() - since
            if idle > self.timeout:
                self._report(step, phase, idle)

    def _report(self, step: int, phase: str, idle: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"rank_{self.rank:05d}"
        with open(f"{stem}.txt", "w") as f:
            f.write(f"rank {self.rank}: no progress for {idle:.0f} s at step {step} ({phase})\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        report = {"rank": self.rank, "step": step, "phase": phase, "idle_s": round(idle, 1), "time": time.time()}
        (self.dir / f".{stem.name}.json").write_text(json.dumps(report))
        os.replace(self.dir / f".{stem.name}.json", f"{stem}.json")  # whole reports only
        time.sleep(self.grace)  # the other ranks' watchdogs fire within about the same time
        fresh = time.time() - 2 * (self.timeout + self.grace)  # reports of this hang, not an old one
        reports = [r for p in self.dir.glob("rank_*.json") if (r := json.loads(p.read_text()))["time"] > fresh]
        stuck, why = stuck_ranks(reports, self.world)
        if self.rank == min(r["rank"] for r in reports):
            (self.dir / "summary.json").write_text(json.dumps(
                {"stuck_ranks": stuck, "why": why, "timeout_s": self.timeout, "reports": reports}, indent=1))
        named = f"stuck: rank {', '.join(map(str, stuck))} ({why})" if stuck else why
        print(f"seqtrain: error: rank {self.rank}: no progress for {idle:.0f} s at step {step} "
              f"(train.hang_timeout_s={self.timeout:g}); {named}; stacks in {self.dir}", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)  # the main thread is stuck: leave without it
