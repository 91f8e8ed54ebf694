"""Megatron-style tensor parallelism, applied to a single-device model from outside.

``apply_tensor_parallel`` replaces the submodules a plan names by sharded versions holding this
rank's slice. On a model built on the meta device the shards are meta too, tagged with their
``TensorSlice``; ``materialize.py`` then fills each from the whole name-seeded parameter, so every
layout starts from the same numbers. Communication uses torch.distributed collectives only, so it
runs on gloo (CPU) and NCCL alike.

The four regions (Shoeybi et al. 2019): a column-parallel linear takes a replicated input
(``copy``: identity forward, all-reduce of the input gradient backward) and gives a sharded
output; a row-parallel linear takes the sharded input and sums the partial outputs
(``reduce``: all-reduce forward, identity backward). Attention heads and the MLP's inner units
split between them, so one block costs two all-reduces forward and two backward.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.loss import ZLoss
from trainer.deepspeed_private import mark_tensor_parallel
from trainer.families import spec

# --------------------------------------------------------------------------- regions


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # gloo wants contiguous buffers, and an in-place collective must not touch a tensor autograd
    # saved: reduce a fresh copy.
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def conjugate(forward, backward) -> type[torch.autograd.Function]:
    """An autograd function computing ``forward(x, group)`` and, for the gradient,
    ``backward(g, group)``: each parallel region is such a pair of collectives (or of one
    collective and the identity or a slice)."""

    class Region(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, g):
            return backward(g, ctx.group), None

    Region.__name__ = Region.__qualname__ = f"Region[{forward.__name__}, {backward.__name__}]"
    return Region


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    """All ranks' ``x`` side by side along the last dim."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _mine_of_last(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)].contiguous()


_Copy = conjugate(_identity, _all_reduce)
_Reduce = conjugate(_all_reduce, _identity)
_Gather = conjugate(_gather_last, _mine_of_last)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _Copy.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _Reduce.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _Gather.apply(x, group)


# --------------------------------------------------------------------------- layers


class TensorSlice(NamedTuple):
    """Where a tensor-parallel shard lies in the whole parameter: chunk ``index`` of ``parts``
    along ``dim`` of a tensor of ``shape``."""

    shape: tuple[int, ...]
    dim: int
    index: int
    parts: int

    def of(self, whole: torch.Tensor) -> torch.Tensor:
        return whole.chunk(self.parts, dim=self.dim)[self.index]


def _shard(p: torch.Tensor, dim: int, group, cache: dict) -> nn.Parameter:
    """This rank's slice of ``p`` along ``dim`` (split over ``group``), as a parameter tagged
    tensor-parallel.

    ``cache`` maps an original parameter to its shard, so tied weights stay tied.
    """
    if id(p) in cache:
        return cache[id(p)][1]
    n, r = dist.get_world_size(group), dist.get_rank(group)
    shard = nn.Parameter(p.detach().chunk(n, dim=dim)[r].clone(), requires_grad=p.requires_grad)
    mark_tensor_parallel(shard, p, dim)
    # On the meta device (sharded construction) the values come later, sliced from the whole
    # parameter by ``materialize.py``, which reads how from here.
    shard.tp_slice = TensorSlice(tuple(p.shape), dim, r, n)
    cache[id(p)] = (p, shard)  # holding p keeps its id from being reused
    return shard


SHARD_DIMS: dict[str, tuple[int, int | None]] = {
    "colwise": (0, 0), "rowwise": (1, None), "vocab_embedding": (0, None), "vocab_head": (0, None),
}
"""Style ► dimension along which its weight and its bias are split (None: replicated, or no
bias). The layers below shard by it; ``consolidate.py`` concatenates by it."""


def _replicated(p: torch.Tensor | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with W and b split by output rows; the output stays sharded."""

    style = "colwise"

    def __init__(self, full: nn.Linear, group, cache: dict) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(full.weight, SHARD_DIMS[self.style][0], group, cache)
        self.bias = None if full.bias is None else _shard(full.bias, SHARD_DIMS[self.style][1], group, cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = Σ_ranks x_r W_rᵀ + b`` with W split by input columns; input sharded, output whole."""

    style = "rowwise"

    def __init__(self, full: nn.Linear, group, cache: dict) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(full.weight, SHARD_DIMS[self.style][0], group, cache)
        # The bias is added once, after the sum: replicated, not sharded.
        self.bias = _replicated(full.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; ids outside this rank's range look up zeros,
    and the all-reduce assembles the full vectors."""

    style = "vocab_embedding"

    def __init__(self, full: nn.Embedding, group, cache: dict) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(full.weight, SHARD_DIMS[self.style][0], group, cache)
        self.start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(self.partial(ids), self.group)

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the vectors (zeros for ids outside its range), before the sum."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        return F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)


class VocabParallelHead(nn.Module):
    """Output projection split by vocabulary (shares the embedding's shard when tied).

    Training mode returns this rank's logits for the vocab-parallel loss; evaluation mode gathers
    the full logits, which decoding and sampling need.
    """

    style = "vocab_head"

    def __init__(self, full: nn.Linear, group, cache: dict) -> None:
        super().__init__()
        self.group = group
        self.weight = _shard(full.weight, SHARD_DIMS[self.style][0], group, cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(copy_to_tp(x, self.group), self.weight)
        return logits if self.training else gather_from_tp(logits, self.group)


class VocabParallelCrossEntropy(ZLoss, nn.Module):
    """Cross-entropy over logits split by vocabulary, equal to ``F.cross_entropy`` on the whole.

    Three all-reduces of per-token scalars replace gathering (tokens × vocab) logits: the max
    (for stability), the sum of exponentials, and the target's logit (owned by one rank).
    Full logits (evaluation mode of ``VocabParallelHead``) take the plain path.
    """

    def __init__(self, full_vocab: int, group, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.full_vocab, self.group, self.label_smoothing = full_vocab, group, label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing if self.training else 0.0
        if logits.shape[-1] == self.full_vocab:
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                                   label_smoothing=eps)
        x = logits.flatten(0, -2).float()
        y = labels.flatten()
        n_local = x.shape[-1]
        start = dist.get_rank(self.group) * n_local
        # The max only shifts for stability; it carries no gradient.
        m = x.detach().max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        z = x - m[:, None]
        sum_exp = reduce_from_tp(z.exp().sum(-1), self.group)
        local_y = y - start
        mine = (local_y >= 0) & (local_y < n_local)
        picked = z.gather(1, local_y.clamp(0, n_local - 1)[:, None]).squeeze(1) * mine
        target = reduce_from_tp(picked, self.group)
        lse = sum_exp.log()
        loss = lse - target
        if eps:
            # Smoothing mixes in the mean of -log p over all classes: lse - mean(z).
            mean_z = reduce_from_tp(z.sum(-1), self.group) / self.full_vocab
            loss = (1 - eps) * loss + eps * (lse - mean_z)
        valid = y != -100
        out = (loss * valid).sum() / valid.sum()
        if self.z_loss:  # log Z = log(sum of exponentials) + the max it was shifted by
            out = out + self.z_term(lse + m, valid, valid.sum())
        return out


# --------------------------------------------------------------------------- plans

SHARDED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
           VocabParallelCrossEntropy)

LAYERS = {c.style: c for c in (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead)}
"""Sharded layer of each style; a plan may also name ``vocab_loss`` (the loss module). The
plans themselves (submodule pattern ► style) are data in each family's spec
(``trainer/families.py``)."""


def planned(model: nn.Module, plan: dict[str, str]) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, attribute, module, style) of each submodule ``plan`` names (its first matching
    pattern), under every name it has; each is looked up when reached, so the caller may
    replace the ones before."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    for name in names:
        style = next((s for pat, s in plan.items() if fnmatch.fnmatchcase(name, pat)), None)
        if style is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        yield parent, attr, getattr(parent, attr), style


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], group,
                          rng_regions: list[tuple[str, str]] = (),
                          full_vocab: int | None = None,
                          layers: dict[str, type[nn.Module]] = LAYERS) -> nn.Module:
    """Replace the submodules ``plan`` names by their sharded versions (``layers``: the class of
    each style; sequence parallelism passes its own), in place."""
    cache: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # a module reachable under two names (shared embeddings) is sharded once
    for parent, attr, full, style in planned(model, plan):
        if isinstance(full, (*SHARDED, *layers.values())):  # sharded already (a pipeline layer, as it was built)
            continue
        if id(full) in done:
            setattr(parent, attr, done[id(full)][1])
            continue
        if style == "vocab_loss":
            new: nn.Module = VocabParallelCrossEntropy(full_vocab or 0, group, full.label_smoothing)
        elif style in layers:
            new = layers[style](full, group, cache)
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r}; one of {[*layers, 'vocab_loss']}")
        new.train(full.training)
        done[id(full)] = (full, new)
        setattr(parent, attr, new)
    for start, end in rng_regions:
        for name, mod in model.named_modules():
            if fnmatch.fnmatchcase(name, start):
                _tensor_parallel_rng(mod, mod.get_submodule(end), dist.get_rank(group))
    return model


def _tensor_parallel_rng(start: nn.Module, end: nn.Module, tp_rank: int) -> None:
    """From ``start``'s entry to ``end``'s entry, dropout draws a random stream of its own per
    tensor rank (Megatron's model-parallel RNG), then the shared stream resumes.

    Everywhere else the activations are replicated and every tensor rank must draw the same
    masks, which the shared seed gives. The region's seed is drawn from that shared stream and
    offset by the tensor rank: distinct per rank, and replayed exactly by activation-checkpoint
    recomputation, which restores the shared stream before re-running a block.
    """
    saved: list = []

    def enter(mod, args):
        if mod.training:
            saved.append(seed_per_rank(tp_rank))

    def leave(mod, args):
        if saved:
            restore_rng(saved.pop())

    start.register_forward_pre_hook(enter)
    end.register_forward_pre_hook(leave)


def seed_per_rank(tp_rank: int) -> tuple:
    """Switch the global generators to a stream of this tensor rank's own, seeded from the shared
    stream; returns the shared state for ``restore_rng``."""
    seed = int(torch.randint(0, 2**62, (1,)))
    saved = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    torch.manual_seed(seed + 7919 * tp_rank)  # also seeds the current CUDA device
    return saved


def restore_rng(saved: tuple) -> None:
    cpu, cuda = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def per_rank_dropout(model: nn.Module, rank: int) -> None:
    """The whole training forward of ``model`` draws dropout from a stream of its own per
    ``rank`` (of the group whose ranks hold different parts of every activation: sequence or
    context parallelism). Activation checkpointing replays it: it saves the generator state at
    each block's entry, inside this stream."""
    saved: list[tuple] = []

    def enter(mod, args):
        if mod.training:
            saved.append(seed_per_rank(rank))

    def leave(mod, args, out):
        if saved:
            restore_rng(saved.pop())

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)


def shard_dim(name: str, family: str) -> int | None:
    """The dimension tensor parallelism splits parameter ``name`` along (``None``: every tensor
    rank holds it whole): the family's plan, looked up the way ``apply_tensor_parallel`` applies it."""
    module, _, kind = name.rpartition(".")
    style = next((s for pat, s in (spec(family).tp_plan or {}).items() if fnmatch.fnmatchcase(module, pat)), None)
    # Not in the plan, or a replicated bias: every rank holds the whole tensor.
    return SHARD_DIMS[style][kind != "weight"] if style else None
