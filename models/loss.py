"""The token-level training loss as a module, so it can be swapped from outside.

Tensor parallelism replaces it with a vocab-parallel cross-entropy (``trainer/parallel/tensor.py``)
that works on logits sharded over the vocabulary; the model code does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZLoss:
    """PaLM's auxiliary z-loss, ``z_loss · log²Z`` per token (Z: the softmax's normaliser), which
    keeps the output logits from drifting; in training mode only. Mixed into a loss module:
    ``z_loss`` is set from outside (``train.z_loss``), and the loss module keeps the running sum
    of its term for the logs (``take_z_loss``), on the device: no host sync per step."""

    z_loss: float = 0.0
    _z_sums: torch.Tensor | None = None  # the terms since the last take_z_loss, and how many
    _z_count: int = 0

    def z_term(self, lse: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """``z_loss`` · the sum of ``lse²`` over ``valid`` tokens / ``scale``; tracked for the logs."""
        term = self.z_loss * (lse.square() * valid).sum() / scale
        self._z_sums = term.detach() if self._z_sums is None else self._z_sums + term.detach()
        self._z_count += 1
        return term

    def take_z_loss(self) -> torch.Tensor | None:
        """The mean z term of the forwards since the last call (a device tensor), then reset."""
        sums, n = self._z_sums, self._z_count
        self._z_sums, self._z_count = None, 0
        return None if sums is None else sums / n


class TokenCrossEntropy(ZLoss, nn.Module):
    """Mean cross-entropy over tokens whose label is not -100, in fp32, plus the z-loss when set.

    Label smoothing and the z-loss apply in training mode only, so evaluation reports the plain loss.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = logits.flatten(0, -2).float(), labels.flatten()
        loss = F.cross_entropy(x, y, ignore_index=-100,
                               label_smoothing=self.label_smoothing if self.training else 0.0)
        if self.z_loss and self.training:
            valid = y != -100
            loss = loss + self.z_term(torch.logsumexp(x, dim=-1), valid, valid.sum())
        return loss
