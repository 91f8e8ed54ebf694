"""The token-level training loss as a module, so it can be swapped from outside.

Tensor parallelism replaces it with a vocab-parallel cross-entropy (``trainer/parallel/tensor.py``)
that works on logits sharded over the vocabulary; the model code does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenCrossEntropy(nn.Module):
    """Mean cross-entropy over tokens whose label is not -100, in fp32.

    Label smoothing applies in training mode only, so evaluation reports the plain loss.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
            label_smoothing=self.label_smoothing if self.training else 0.0,
        )
