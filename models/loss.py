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
        self.track_z(term)
        return term

    def track_z(self, term: torch.Tensor) -> None:
        """Add one forward's z term to the running sum the logs read."""
        self._z_sums = term.detach() if self._z_sums is None else self._z_sums + term.detach()
        self._z_count += 1

    def take_z_loss(self) -> torch.Tensor | None:
        """The mean z term of the forwards since the last call (a device tensor), then reset."""
        sums, n = self._z_sums, self._z_count
        self._z_sums, self._z_count = None, 0
        return None if sums is None else sums / n


class TokenCrossEntropy(ZLoss, nn.Module):
    """Mean cross-entropy over tokens whose label is not -100, in fp32, plus the z-loss when set.

    Label smoothing and the z-loss apply in training mode only, so evaluation reports the plain loss.
    ``head_forward`` computes the output layer too, in chunks of ``chunk_tokens`` tokens (set
    from outside: ``train.loss_chunk``), so that the whole ``tokens × vocab`` logits never exist.
    """

    chunk_tokens: int = 0
    """Tokens per chunk of ``head_forward``; 0 (or no more tokens than this): whole logits."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def head_forward(self, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``self(F.linear(h, weight), labels)``, chunked over tokens when ``chunk_tokens`` asks."""
        x, y = h.flatten(0, -2), labels.flatten()
        if not self.chunk_tokens or x.shape[0] <= self.chunk_tokens:
            return self(F.linear(h, weight), labels)
        eps = self.label_smoothing if self.training else 0.0
        z = self.z_loss if self.training else 0.0
        loss, z_term = LinearCrossEntropy.apply(x, weight, y, self.chunk_tokens, eps, z)
        if z:
            self.track_z(z_term)
        return loss

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = logits.flatten(0, -2).float(), labels.flatten()
        loss = F.cross_entropy(x, y, ignore_index=-100,
                               label_smoothing=self.label_smoothing if self.training else 0.0)
        if self.z_loss and self.training:
            valid = y != -100
            loss = loss + self.z_term(torch.logsumexp(x, dim=-1), valid, valid.sum())
        return loss


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(h @ weight.T, labels)`` (mean over labels != -100, label smoothing,
    ``z · lse²``), computed ``chunk`` tokens at a time: at most one chunk's fp32 logits exist.

    The gradients are computed in the forward, chunk by chunk (the softmax is at hand there),
    and kept for backward instead of the logits: ``h``'s (the size of ``h``) and ``weight``'s
    (accumulated in fp32). So nothing is recomputed, and the memory between forward and
    backward drops from ``tokens × vocab`` (fp32, plus the logits in the weights' dtype) to
    ``tokens × d_model + vocab × d_model``. Returns (loss, the z term's share, detached)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                smoothing: float, z: float) -> tuple[torch.Tensor, torch.Tensor]:
        valid = labels != -100
        count = valid.sum()  # a device scalar: no host sync
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        loss = torch.zeros((), device=h.device)
        z_sum = torch.zeros((), device=h.device)
        vocab = weight.shape[0]
        for start in range(0, h.shape[0], chunk):
            hc, y, ok = h[start:start + chunk], labels[start:start + chunk], valid[start:start + chunk]
            x = F.linear(hc, weight).float()
            lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            token = (1 - smoothing) * (lse - picked) + smoothing * (lse - x.mean(-1)) + z * lse.square()
            loss += (token * ok).sum()
            z_sum += (z * lse.square() * ok).sum()
            if not grads:
                continue
            # d token / d x = softmax · (1 + 2 z lse) - (1 - ε) onehot(y) - ε / V
            g = x.sub_(lse[:, None]).exp_().mul_((1 + 2 * z * lse)[:, None])  # in place: one chunk-sized buffer
            g.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(lse, smoothing - 1)[:, None])
            g.sub_(smoothing / vocab).mul_((ok / count)[:, None])
            g = g.to(h.dtype)
            grad_h[start:start + chunk] = g @ weight
            grad_w.add_(g.t() @ hc)  # in fp32 across chunks
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss / count, z_sum.detach() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_z: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None
