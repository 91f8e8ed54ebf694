"""Scores of the example families beside the validation loss: a classifier's accuracy, a
text-line recognizer's character error rate. Both read the same ``eval.batches`` micro-batches
as ``val_loss``, shared out across dp ranks, and sum their counts over the ranks."""

from __future__ import annotations

from collections.abc import Callable

import jiwer
import torch

from models.mdrnn import ctc_greedy
from trainer.data.textlines import decode
from trainer.loop import Trainer

Counts = Callable[[dict, torch.Tensor, torch.nn.Module], tuple[float, float]]


def _hits(batch: dict, logits: torch.Tensor, model) -> tuple[float, float]:
    """(right, examples): the highest logit is the label."""
    return float((logits.argmax(-1).cpu() == batch["labels"]).sum()), float(len(batch["labels"]))


def _char_errors(batch: dict, log_probs: torch.Tensor, model) -> tuple[float, float]:
    """(edits, reference characters) of the best-path transcriptions (jiwer's alignment)."""
    hyps = [decode(ids) for ids in ctc_greedy(log_probs, model.output_lengths(batch["widths"]))]
    refs = [decode(row[:n].tolist()) for row, n in zip(batch["labels"], batch["label_lengths"], strict=True)]
    return char_errors(refs, hyps)


def char_errors(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """(substitutions + deletions + insertions, reference characters)."""
    o = jiwer.process_characters(refs, hyps)
    return float(o.substitutions + o.deletions + o.insertions), float(o.substitutions + o.deletions + o.hits)


class ExampleValidation:
    """``val_accuracy`` (classifiers) or ``val_cer`` (text lines) over the validation slice."""

    def __init__(self, kind: str) -> None:
        self.name, self.counts = ("val_cer", _char_errors) if kind == "images" else ("val_accuracy", _hits)

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        batches, counted, _ = trainer.eval_slice(trainer.data.val)
        outs = trainer.module.predict(batches)  # every rank the same count (ZeRO-3 gathers)
        total = torch.zeros(2, dtype=torch.float64)
        for batch, out in list(zip(batches, outs, strict=True))[:counted]:
            total += torch.tensor(self.counts(batch, out, trainer.module.model), dtype=torch.float64)
        total = trainer.dims.dp_mean(total.to(trainer.device)) * trainer.dims.dp  # collective: every rank's sums
        return {self.name: float(total[0] / total[1])}
