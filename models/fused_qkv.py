"""Fused attention input projections: q, k and v (or k and v) from one matmul, head-major rows.

The fused weight's rows go head by head: head 0's q rows, its k rows, its v rows, then head 1's,
and so on (Megatron-LM's layout). A contiguous 1/tp of the rows is therefore whole heads with all
their parts: tensor parallelism cuts the fused projection like any column-parallel linear, each
rank's shard is the fused projection of its own heads, and checkpoints merge shards by plain
concatenation. GPT-2's ``c_attn`` (and checkpoints written before the fusion) keep q, k and v in
separate blocks; ``fuse`` and ``unfuse`` convert, exactly (a permutation of rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

LEGACY = {
    # family ► (the separate projections checkpoints before the fusion held, the fused one)
    "gpt": ((("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.c_attn"),),
    "encdec": ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.qkv_proj"),
               (("cross_attn.k_proj", "cross_attn.v_proj"), "cross_attn.kv_proj")),
}


def fuse(parts: Sequence[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Separate projections' weights (or biases), each ``(heads * head_dim, ...)``, as one fused
    head-major tensor ``(heads * len(parts) * head_dim, ...)``."""
    return torch.stack([p.unflatten(0, (-1, head_dim)) for p in parts], dim=1).flatten(0, 2)


def unfuse(fused: torch.Tensor, head_dim: int, n_parts: int) -> list[torch.Tensor]:
    """The inverse of ``fuse``: the separate projections, each ``(heads * head_dim, ...)``."""
    per_head = fused.unflatten(0, (-1, n_parts, head_dim))
    return [per_head[:, i].flatten(0, 1) for i in range(n_parts)]


def split_heads(y: torch.Tensor, head_dim: int, n_parts: int) -> tuple[torch.Tensor, ...]:
    """A fused projection's output ``(B, T, heads * n_parts * head_dim)`` as ``n_parts`` tensors
    ``(B, heads, T, head_dim)``, the layout SDPA takes (views: no copy)."""
    b, t, _ = y.shape
    return y.view(b, t, -1, n_parts, head_dim).permute(3, 0, 2, 1, 4).unbind(0)


def fuse_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Grouped-query attention's separate projections (``q``: ``n_head`` heads, ``k`` and ``v``:
    ``n_kv_head``) as one fused tensor ordered by key/value group: a group's query heads, its
    key head, its value head. With as many key/value heads as query heads this is ``fuse``."""
    n_kv = k.shape[0] // head_dim
    parts = (q.unflatten(0, (n_kv, -1)), k.unflatten(0, (n_kv, head_dim)), v.unflatten(0, (n_kv, head_dim)))
    return torch.cat(parts, dim=1).flatten(0, 1)


def unfuse_groups(fused: torch.Tensor, head_dim: int, group: int) -> list[torch.Tensor]:
    """The inverse of ``fuse_groups``: ``[q, k, v]`` for ``group`` query heads per key/value head."""
    per_group = fused.unflatten(0, (-1, (group + 2) * head_dim))
    return [t.flatten(0, 1) for t in per_group.split([group * head_dim, head_dim, head_dim], dim=1)]


def split_groups(y: torch.Tensor, head_dim: int, group: int) -> tuple[torch.Tensor, ...]:
    """A ``fuse_groups`` projection's output ``(B, T, n_kv · (group + 2) · head_dim)`` as
    ``q (B, n_kv · group, T, head_dim)``, ``k`` and ``v`` ``(B, n_kv, T, head_dim)``; query head
    ``j`` reads key/value head ``j // group`` (what SDPA's ``enable_gqa`` and transformers'
    ``repeat_kv`` assume). ``group`` 1 is ``split_heads(y, head_dim, 3)``."""
    if group == 1:
        return split_heads(y, head_dim, 3)
    b, t, _ = y.shape
    per_group = y.view(b, t, -1, group + 2, head_dim)
    q = per_group[:, :, :, :group].flatten(2, 3).transpose(1, 2)
    return q, per_group[:, :, :, group].transpose(1, 2), per_group[:, :, :, group + 1].transpose(1, 2)


def legacy_names(names: Sequence[str], family: str) -> dict[str, tuple[str, ...]]:
    """Fused parameter name ► the separate names it is made from, for every fusion whose
    separate tensors ``names`` holds (a checkpoint from before the fusion); empty otherwise."""
    out: dict[str, tuple[str, ...]] = {}
    present = set(names)
    for olds, new in LEGACY.get(family, ()):
        for n in names:
            for part in ("weight", "bias"):
                suffix = f"{olds[0]}.{part}"
                if n.endswith(suffix):
                    prefix = n.removesuffix(suffix)
                    srcs = tuple(f"{prefix}{o}.{part}" for o in olds)
                    if all(s in present for s in srcs):
                        out[f"{prefix}{new}.{part}"] = srcs
    return out


def upgrade_for(sd: Mapping[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """``upgrade`` for a model of config ``model_cfg`` (families without attention as they are)."""
    if not hasattr(model_cfg, "n_head"):
        return dict(sd)
    return upgrade(sd, model_cfg.family, model_cfg.d_model // model_cfg.n_head)


def upgrade(sd: Mapping[str, torch.Tensor], family: str, head_dim: int) -> dict[str, torch.Tensor]:
    """A state dict (weights, or any per-parameter tensors such as Adam's moments) of a checkpoint
    from before the fusion, under today's names and layout; unchanged when it has none."""
    fusions = legacy_names(list(sd), family)
    old = {s for srcs in fusions.values() for s in srcs}
    out = {k: v for k, v in sd.items() if k not in old}
    out.update({new: fuse([sd[s] for s in srcs], head_dim) for new, srcs in fusions.items()})
    return out
