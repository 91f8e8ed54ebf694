"""Context parallelism, DeepSpeed-Ulysses style (Jacobs et al. 2023): a GPT's sequences split
across the ``cp`` ranks of a group, applied to the single-device model from outside.

Each rank embeds, normalises and runs the MLP on its own 1/cp of every sequence. Attention needs
the whole sequence, so around it two all-to-alls trade the cut: after the fused q/k/v projection
a rank sends each other rank that rank's heads of its tokens and receives its own heads of
everyone's tokens (sequence-sharded ► head-sharded), attention runs on n_head/cp heads over the
whole causal sequence, and the inverse all-to-all brings the outputs back to token shards
before the output projection. Per block that is 4 all-to-alls (2 forward, 2 backward) of
(b · s · 3h)/cp and (b · s · h)/cp elements per rank, independent of cp in total, where ring
attention would pass keys and values around cp − 1 times.

Every rank holds the whole model; gradients are averaged with the data-parallel ones over
dp · cp ranks (``dims.py``). Each rank's loss is its tokens' summed loss over the replica's
token count, times cp, so that average is the gradient of the replica's mean token loss
exactly, and the logged mean over dp · cp ranks is that loss.

The model is fed whole sequences (the data path does not change); the embeddings take this
rank's part and the loss its labels. Evaluation mode runs each sequence whole on every rank:
decoding one token at a time has nothing to split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.loss import ZLoss
from trainer.parallel.sequence import sequence_shard
from trainer.parallel.tensor import conjugate, per_rank_dropout, planned

PLAN = {"wte": "tokens", "wpe": "positions", "*.attn.c_attn": "to_heads", "*.attn.c_proj": "to_tokens",
        "loss_fn": "loss"}
"""Module name pattern ► role, for a ``GPT`` (``models/gpt.py``)."""

# --------------------------------------------------------------------------- all-to-all


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # before empty_like, which would copy a permuted input's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def tokens_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(b, s/cp, c) with channels head-major ► (b, s, c/cp): this rank's heads, every token."""
    n = dist.get_world_size(group)
    b, s_local, c = x.shape
    # Chunk j of dim 0 goes to rank j: the channels of its heads, for this rank's tokens.
    parts = _all_to_all(x.reshape(b, s_local, n, c // n).permute(2, 1, 0, 3), group)
    # Received chunk i: rank i's tokens, in rank order, so the sequence comes out in order.
    return parts.reshape(n * s_local, b, c // n).transpose(0, 1)


def heads_to_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """(b, s, c/cp) ► (b, s/cp, c): the inverse of ``tokens_to_heads``."""
    n = dist.get_world_size(group)
    b, s, c_local = x.shape
    parts = _all_to_all(x.reshape(b, n, s // n, c_local).permute(1, 2, 0, 3), group)
    return parts.permute(2, 1, 0, 3).reshape(b, s // n, n * c_local)


_TokensToHeads = conjugate(tokens_to_heads, heads_to_tokens)
_HeadsToTokens = conjugate(heads_to_tokens, tokens_to_heads)


# --------------------------------------------------------------------------- layers
# Each keeps the wrapped module's parameters (the same objects, under the same names), so
# checkpoints, initial values and ZeRO-3's per-module gathering do not change.


class _Wrapper(nn.Module):
    def __init__(self, full: nn.Module, group) -> None:
        super().__init__()
        self.group = group
        for name, p in full.named_parameters(recurse=False):
            setattr(self, name, p)
        if isinstance(full, nn.Linear) and full.bias is None:
            self.bias = None


class ContextTokens(_Wrapper):
    """The token embedding of this rank's part of the sequence."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(sequence_shard(ids, self.group) if self.training else ids, self.weight)


class ContextPositions(_Wrapper):
    """Called with the whole sequence's positions: this rank's rows."""

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(sequence_shard(pos[None], self.group)[0] if self.training else pos, self.weight)


class ContextToHeads(_Wrapper):
    """The fused q/k/v projection on this rank's tokens, then sequence ► heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return _TokensToHeads.apply(y, self.group) if self.training else y


class ContextToTokens(_Wrapper):
    """Heads ► sequence, then the output projection on this rank's tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = _HeadsToTokens.apply(x, self.group)
        return F.linear(x, self.weight, self.bias)


class ContextLoss(ZLoss, nn.Module):
    """This rank's share of the replica's mean token loss, scaled for an average over cp ranks:
    cp · (sum of its tokens' losses) / (the replica's target tokens)."""

    def __init__(self, full: nn.Module, group) -> None:
        super().__init__()
        self.group, self.label_smoothing = group, getattr(full, "label_smoothing", 0.0)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing if self.training else 0.0
        if not self.training:
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        labels = sequence_shard(labels, self.group).flatten()
        total = F.cross_entropy(logits.flatten(0, -2).float(), labels, ignore_index=-100,
                                reduction="sum", label_smoothing=eps)
        valid = labels != -100
        count = valid.sum().float()
        dist.all_reduce(count, group=self.group)  # a count: no gradient
        cp = dist.get_world_size(self.group)
        loss = total * cp / count
        if self.z_loss:  # scaled as the cross-entropy: the mean over dp · cp ranks is the replica's
            loss = loss + self.z_term(torch.logsumexp(logits.flatten(0, -2).float(), dim=-1), valid, count / cp)
        return loss


ROLES: dict[str, type[nn.Module]] = {
    "tokens": ContextTokens, "positions": ContextPositions, "to_heads": ContextToHeads,
    "to_tokens": ContextToTokens, "loss": ContextLoss,
}


def apply_context_parallel(model: nn.Module, group, plan: dict[str, str] = PLAN) -> nn.Module:
    """Swap the modules ``plan`` names for their context-parallel versions, in place; every
    dropout then draws per cp rank (each holds other tokens)."""
    for parent, attr, full, role in planned(model, plan):
        new = ROLES[role](full, group)
        new.train(full.training)
        setattr(parent, attr, new)
    per_rank_dropout(model, dist.get_rank(group))
    return model
