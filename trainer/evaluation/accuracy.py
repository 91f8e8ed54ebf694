"""Classification accuracy beside the validation loss (the classifier families)."""

from __future__ import annotations

import torch

from trainer.loop import Trainer


class AccuracyValidation:
    """Share of the validation slice's examples (the same ``eval.batches`` micro-batches as
    ``val_loss``, shared out across dp ranks) whose highest logit is their label."""

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        val, dims = trainer.data.val, trainer.dims
        n, dp, rank = trainer.eval_count(val), dims.dp, dims.dp_rank
        rounds = -(-n // dp)
        batches = list(val.eval_batches(rank, dp, rounds))
        logits = trainer.module.predict(batches)  # every rank the same count (ZeRO-3 gathers)
        hits = torch.zeros(2, dtype=torch.float64)
        for b, (batch, out) in enumerate(zip(batches, logits, strict=True)):
            if b * dp + rank < n:  # a surplus round counts nothing
                hits[0] += (out.argmax(-1).cpu() == batch["labels"]).sum()
                hits[1] += len(batch["labels"])
        hits = dims.dp_mean(hits.to(trainer.device)) * dp  # collective: the sums of every rank
        return {"val_accuracy": float(hits[0] / hits[1])}
