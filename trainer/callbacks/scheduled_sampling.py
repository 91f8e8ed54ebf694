"""Scheduled sampling (Bengio et al., 2015): the probability that the RNN decoder feeds its own
prediction, raised with the step."""

from __future__ import annotations

from trainer.loop import Callback, Trainer


class ScheduledSampling(Callback):
    """Sets the RNN decoder's scheduled-sampling probability ε from the step (a linear rise)."""

    def on_step_start(self, trainer: Trainer) -> None:
        trainer.module.model.sampling_prob = trainer.cfg.train.scheduled_sampling.eps(trainer.step)

