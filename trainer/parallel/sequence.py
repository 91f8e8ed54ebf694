"""Megatron-style sequence parallelism (Korthikanti et al. 2022), applied with tensor parallelism.

Plain tensor parallelism replicates every activation outside attention and the MLP: each tensor
rank runs the same LayerNorms and dropouts on the whole sequence. Sequence parallelism cuts
those regions along the sequence instead, so each rank holds 1/tp of them, and turns each
block's two all-reduces into what they are made of:

- into a column-parallel linear (and the head): **all-gather** the sequence forward,
  **reduce-scatter** its gradient backward;
- out of a row-parallel linear (and the vocab-parallel embedding): **reduce-scatter** forward,
  **all-gather** backward.

The volume is that of the all-reduces it replaces (a ring all-reduce is a reduce-scatter then an
all-gather). A column-parallel linear keeps only this rank's part of its input for backward and
gathers it again there (Megatron does the same), so no whole-sequence tensor outlives its layer.

Parameters used on a sequence shard (LayerNorms, the row-parallel bias) see only their rank's
tokens: their gradients are summed over the tensor group in backward (``copy_to_tp`` on the
parameter), so every rank holds the whole gradient, as without sequence parallelism.

Evaluation mode (``model.eval()``) runs plain tensor parallelism: decoding one token at a time
has no sequence to cut, and nothing is saved for backward there anyway. Every dropout in
training then acts on a shard (of the sequence or of the heads), so the whole forward draws from
a stream of its own per tensor rank (``per_rank_dropout``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.parallel.tensor import (
    LAYERS,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    apply_tensor_parallel,
    conjugate,
    copy_to_tp,
    per_rank_dropout,
)

SEQ_DIM = 1
"""Activations are (batch, sequence, hidden)."""



def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # The one-tensor collectives (NCCL's own; gloo has them too) under their torch ≥ 2.13
    # names, where older releases say *_into_tensor / *_tensor. Looked up at each call, so
    # the communication counter (trainer/accounting/comm.py) sees them whenever it was installed.
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, group) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)

# --------------------------------------------------------------------------- collectives


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(b, s/tp, h) on each rank ► (b, s, h), rank order along the sequence."""
    # The tensor collectives work on dim 0: move the sequence there (a copy unless b == 1).
    xt = x.transpose(0, SEQ_DIM).contiguous()
    out = xt.new_empty((xt.shape[0] * dist.get_world_size(group), *xt.shape[1:]))
    _all_gather(out, xt, group=group)
    return out.transpose(0, SEQ_DIM)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(b, s, h) partial sums on each rank ► this rank's (b, s/tp, h) of their sum."""
    xt = x.transpose(0, SEQ_DIM).contiguous()
    out = xt.new_empty((xt.shape[0] // dist.get_world_size(group), *xt.shape[1:]))
    _reduce_scatter(out, xt, group=group)
    return out.transpose(0, SEQ_DIM)


def sequence_shard(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's part of a tensor every rank holds whole (no communication)."""
    return x.chunk(dist.get_world_size(group), dim=SEQ_DIM)[dist.get_rank(group)]


def _split_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return sequence_shard(x, group).contiguous()


# Leaving a row-parallel region: reduce-scatter forward, all-gather backward.
_ScatterSequence = conjugate(reduce_scatter_sequence, gather_sequence)
# This rank's part of a replicated tensor forward, the whole gradient gathered backward.
_SplitSequence = conjugate(_split_sequence, gather_sequence)


class _GatherLinear(torch.autograd.Function):
    """``gather_sequence(x) Wᵀ + b`` (entering a column-parallel region), saving only ``x``.

    Backward gathers ``x`` again for the weight gradient, and reduce-scatters the input gradient:
    each rank's partial sum over its output columns, summed and cut back to its tokens.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(gather_sequence(x, group), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        whole = gather_sequence(x, ctx.group)
        grad_x = reduce_scatter_sequence(g.matmul(weight), ctx.group)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(whole.reshape(-1, whole.shape[-1]))
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


# --------------------------------------------------------------------------- layers


class SequenceParallelColumnLinear(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return _GatherLinear.apply(x, self.weight, self.bias, self.group)


class SequenceParallelRowLinear(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y = _ScatterSequence.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + copy_to_tp(self.bias, self.group)


class SequenceParallelEmbedding(VocabParallelEmbedding):
    """Each rank looks up its vocabulary range for the whole sequence; the reduce-scatter
    assembles the vectors of this rank's tokens only."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(ids)
        return _ScatterSequence.apply(self.partial(ids), self.group)


class SequenceParallelHead(VocabParallelHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return _GatherLinear.apply(x, self.weight, None, self.group)


class SequenceParallelNorm(nn.Module):
    """A LayerNorm or RMSNorm on this rank's tokens; its parameters stay whole (the same
    ``Parameter`` objects, so names and checkpoints do not change) with gradients summed over
    the group."""

    style = "norm"

    def __init__(self, full: nn.LayerNorm | nn.RMSNorm, group, cache: dict) -> None:
        super().__init__()
        self.group, self.shape, self.eps = group, full.normalized_shape, full.eps
        self.rms = isinstance(full, nn.RMSNorm)
        self.weight, self.bias = full.weight, getattr(full, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.training:
            w = None if w is None else copy_to_tp(w, self.group)
            b = None if b is None else copy_to_tp(b, self.group)
        if self.rms:
            return F.rms_norm(x, self.shape, w, self.eps)
        return F.layer_norm(x, self.shape, w, b, self.eps)


class SequenceParallelPositions(nn.Module):
    """Learned positions: called with the whole sequence's positions, returns this rank's rows.

    Looked up whole and split (Megatron's scatter to the sequence-parallel region): backward
    gathers the (s, h) gradient, so the table's gradient is whole on every rank without an
    all-reduce of the table."""

    style = "positions"

    def __init__(self, full: nn.Embedding, group, cache: dict) -> None:
        super().__init__()
        self.group, self.weight = group, full.weight

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.embedding(pos, self.weight)
        return _SplitSequence.apply(F.embedding(pos, self.weight)[None], self.group)[0]


SP_LAYERS: dict[str, type[nn.Module]] = {
    **LAYERS,
    "colwise": SequenceParallelColumnLinear, "rowwise": SequenceParallelRowLinear,
    "vocab_embedding": SequenceParallelEmbedding, "vocab_head": SequenceParallelHead,
    "norm": SequenceParallelNorm, "positions": SequenceParallelPositions,
}


def apply_sequence_parallel(model: nn.Module, tp_plan: dict[str, str], sp_plan: dict[str, str], group,
                            full_vocab: int | None = None) -> nn.Module:
    """Tensor parallelism with the sequence-parallel layers, in place; ``sp_plan`` names the
    modules that run on a sequence shard with whole parameters (norms, positions)."""
    apply_tensor_parallel(model, {**sp_plan, **tp_plan}, group, full_vocab=full_vocab, layers=SP_LAYERS)
    per_rank_dropout(model, dist.get_rank(group))
    return model
