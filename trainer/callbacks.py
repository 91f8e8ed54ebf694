"""Optional behaviour of the train loop, as callbacks with named hooks.

Hooks run on every rank (a callback that only writes does its own rank-0 check); a hook that
runs a collective (evaluation, checkpointing) must therefore be reached by all ranks alike.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from trainer import checkpoint

if TYPE_CHECKING:
    from trainer.loop import Trainer


class Callback:
    def on_load(self, trainer: Trainer) -> None:
        """Before ``on_train_start`` of any callback: restore state (the checkpoint callback
        resumes here, so every train-start hook sees the restored step)."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...


class MetricsFile(Callback):
    """``metrics.jsonl``: one JSON object per logged step (train rows and eval rows)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0 and self.path.exists():
            # Resuming: rows past the restored step belong to a timeline that no longer exists.
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= trainer.step]
            self.path.write_text("".join(r + "\n" for r in kept))

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.is_rank0:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")


class ProgressBar(Callback):
    """A tqdm bar on rank 0 with the latest loss; log lines printed above it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0:
            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                            disable=None)  # no bar when stderr is a log file, not a terminal

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if "val_loss" in metrics:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")
            self.bar.write(f"step {metrics['step']:>6}  {shown}")
            return
        gn = metrics.get("grad_norm")
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        self.bar.write(
            f"step {metrics['step']:>6}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"grad_norm {gn if gn is None else f'{gn:.3f}'}  tok/s {metrics['tokens_per_s']:,.0f}  "
            f"mfu {100 * metrics['mfu']:.1f}%"
        )

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class Evaluate(Callback):
    """Validation loss every ``eval.every`` steps and at the end (a collective); with
    ``eval.at_start`` also before the first step."""

    def on_step_start(self, trainer: Trainer) -> None:
        # At the first step's start, not at train start: every callback (MLflow) is set up.
        if trainer.step == 0 and trainer.cfg.eval.at_start:
            trainer.log({"step": 0, **trainer.evaluate()})

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.cfg.eval.every
        if every and trainer.step % every == 0 and trainer.step < trainer.cfg.train.steps:
            trainer.log({"step": trainer.step, **trainer.evaluate()})

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None:  # a preempted job spends its grace time on saving
            trainer.log({"step": trainer.step, **trainer.evaluate()})


class ScheduledSampling(Callback):
    """Sets the RNN decoder's scheduled-sampling probability ε from the step (a linear rise)."""

    def on_step_start(self, trainer: Trainer) -> None:
        trainer.module.model.sampling_prob = trainer.cfg.train.scheduled_sampling.eps(trainer.step)


class Checkpoint(Callback):
    """Resume from the newest intact checkpoint before training starts; save every
    ``checkpoint.every`` steps and at the end. Both are collectives, and both go through
    ``trainer/checkpoint.py``. Saves see the state after every earlier callback's step-end
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

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_saved = trainer.step
        if trainer.cfg.checkpoint.async_:
            from trainer.checkpoint_async import AsyncSaver

            self.saver = AsyncSaver()  # a collective (the writers' gloo group): every rank, here

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.cfg.checkpoint.every
        if every and trainer.step % every == 0:
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
