"""Checkpoints in the loop: resume before the first step, save on the cadence and at the end
(both collectives through ``trainer/checkpoint/``), and ``finished.json`` once a run is over."""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer import checkpoint
from trainer.checkpoint.async_writer import AsyncSaver
from trainer.loop import Callback, Trainer


class Checkpoint(Callback):
    """Resume from the newest intact checkpoint before training starts; save every
    ``checkpoint.every`` steps and at the end. Both are collectives, and both go through
    ``trainer/checkpoint/``. Saves see the state after every earlier callback's step-end
    hook (a stop signal at step s, an evaluation), so it comes late in the list."""

    def __init__(self, ckpt_root: Path, tokenizer_sha256: str) -> None:
        self.root = ckpt_root
        self.tokenizer_sha256 = tokenizer_sha256
        self.last_saved = -1
        self.saver = None  # an AsyncSaver with checkpoint.async

    def _say(self, trainer: Trainer, msg: str) -> None:
        if trainer.is_rank0:
            print(msg, flush=True)

    def _resume(self, trainer: Trainer) -> None:
        t0 = time.perf_counter()
        restored = checkpoint.load(trainer.module, self.root, trainer.cfg, self.tokenizer_sha256,
                                   warn=lambda m: self._say(trainer, m))
        if restored is None:
            return
        trainer.load_state_dict(restored.client_state)
        if restored.rank_state is not None:
            trainer.load_rank_state(restored.rank_state)
        self._say(trainer, f"resumed from {restored.path} at step {trainer.step} "
                           f"(loaded in {time.perf_counter() - t0:.2f} s)")

    def _save(self, trainer: Trainer) -> None:
        if self.saver is not None:
            self._finish(trainer)  # one save in flight at a time: the previous one first
        t0 = time.perf_counter()
        try:
            path = checkpoint.save(trainer.module, self.root, trainer.step, trainer.state_dict(),
                                   trainer.cfg.to_yaml(), trainer.cfg.checkpoint.keep_last,
                                   trainer.rank_state(), {"tokenizer_sha256": self.tokenizer_sha256},
                                   saver=self.saver)
        except checkpoint.SaveFailed as e:
            self._failed(trainer, e)
            return
        self.last_saved = trainer.step
        if self.saver is not None:
            self._say(trainer, f"saving {path.name} behind training (snapshot in {time.perf_counter() - t0:.2f} s)")
        elif trainer.is_rank0:
            print(f"saved {path.name} ({checkpoint.dir_mb(path):.1f} MB) in {time.perf_counter() - t0:.2f} s", flush=True)

    def _finish(self, trainer: Trainer) -> None:
        """Collective: wait for the asynchronous save in flight, if any."""
        try:
            done = checkpoint.wait(self.saver)
        except checkpoint.SaveFailed as e:
            self._failed(trainer, e)
            return
        if done is not None and trainer.is_rank0:
            path, seconds = done
            print(f"saved {path.name} ({checkpoint.dir_mb(path):.1f} MB), written in {seconds:.2f} s behind training",
                  flush=True)

    def _failed(self, trainer: Trainer, e: checkpoint.SaveFailed) -> None:
        if trainer.cfg.checkpoint.on_error != "continue":
            raise e
        self._say(trainer, f"warning: {e}; training goes on (checkpoint.on_error=continue)")

    def on_load(self, trainer: Trainer) -> None:
        self._resume(trainer)

    def newest_before(self, step: int) -> int | None:
        """The step of the newest complete checkpoint saved before ``step``, if any."""
        found = checkpoint.newest_before(self.root, step)
        return None if found is None else checkpoint.step_of(found)

    def rewind(self, trainer: Trainer, before_step: int) -> int | None:
        """Collective: restore the newest checkpoint from before ``before_step`` (newer ones are
        set aside, so a resume takes it too); the restored step, or None when there is none."""
        if self.saver is not None:
            self._finish(trainer)  # a save in flight publishes first, then is set aside with the rest
        if checkpoint.set_aside(self.root, before_step) is None:
            return None
        self._resume(trainer)
        self.last_saved = trainer.step  # on disk already: the step-end hook must not save it again
        return trainer.step

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_saved = trainer.step
        if trainer.cfg.checkpoint.async_:
            self.saver = AsyncSaver()  # a collective (the writers' gloo group): every rank, here
            trainer.module.before_update.append(self.saver.fence)

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.cfg.checkpoint.every
        if every and trainer.step % every == 0 and trainer.step != self.last_saved:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_saved != trainer.step:
            self._save(trainer)
        if self.saver is not None:
            self._finish(trainer)


FINISHED = "finished.json"


class RunFinished(Callback):
    """``finished.json`` in the run directory once the run will not go on (its steps done, or
    stopped for divergence), written after the final checkpoint: what ``seqtrain eval --follow``
    waits for. A stop for preemption writes none (the requeued job continues); a resumed or
    extended run removes it at its start."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / FINISHED

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0:
            self.path.unlink(missing_ok=True)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.is_rank0 and (trainer.stop_reason is None or trainer.diverged):
            checkpoint.atomic_write(self.path, json.dumps({"step": trainer.step,
                                                           "reason": trainer.stop_reason or "completed"}))
