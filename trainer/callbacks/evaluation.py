"""When the validation loss (and the data's extra evaluations) run: the loop's ``evaluate``."""

from __future__ import annotations

from trainer.loop import Callback, Trainer


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

