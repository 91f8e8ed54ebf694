"""Whole single-device weights from a checkpoint saved under tensor and/or pipeline parallelism.

DeepSpeed writes, per tensor rank ``t``, ``mp_rank_{t}_model_states.pt`` (the module's state)
or, under a pipeline, one ``layer_{i}-model_{t}-model_states.pt`` per layer. We map pipeline
layer names back to ``GPT`` names, then concatenate tensor-parallel shards along the dimension
the family's plan split them (the same plan that sharded them): consolidate, then any layout
can shard again (``train.init_from``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.checkpoint.format import safe_load
from trainer.checkpoint.weights import Weights
from trainer.errors import CheckpointError
from trainer.parallel.pipeline import single_device_name
from trainer.parallel.tensor import shard_dim


def layer_files(ckpt: Path, t: int) -> list[tuple[int, Path]]:
    """(layer index, file) of tensor rank ``t``'s pipeline layer files, every stage's."""
    files = sorted(ckpt.glob(f"layer_*-model_{t:02d}-model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt}: no pipeline layer files for tensor rank {t}")
    return [(int(re.match(r"layer_(\d+)-", f.name).group(1)), f) for f in files]


def _pipeline_rank_state(ckpt: Path, t: int, model_cfg, mmap: bool = False) -> dict[str, torch.Tensor]:
    """One tensor rank's parameters under their single-device names, from the layer files."""
    out: dict[str, torch.Tensor] = {}
    for idx, f in layer_files(ckpt, t):
        for k, v in safe_load(f, mmap=mmap).items():
            # Layer 0 is the token embedding (a tied module when the head shares it).
            name = k if idx == 0 else single_device_name(f"{idx}.{k}", model_cfg)
            if name is not None:
                out[name] = v
    if model_cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]  # as GPT's state dict lists the tied head
    return out


def merge_one(name: str, states: list[dict[str, torch.Tensor]], family: str) -> torch.Tensor:
    """The whole tensor ``name`` from each tensor rank's shard of it."""
    dim = shard_dim(name, family)
    return states[0][name] if dim is None else torch.cat([s[name] for s in states], dim=dim)


def merge_tensor_parallel(states: list[dict[str, torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
    """Whole tensors from each tensor rank's shards (weights or optimizer moments alike)."""
    return {name: merge_one(name, states, family) for name in states[0]}


def consolidate(ckpt: Path, cfg) -> dict[str, torch.Tensor]:
    """Whole weights of a tensor- and/or pipeline-parallel checkpoint without ZeRO (``cfg``: its
    config), where the module's weights are the master copy; ZeRO checkpoints are read from
    their optimizer shards by ``reshard.weights``."""
    w = consolidate_lazily(ckpt, cfg)
    return {k: w[k] for k in w}


def consolidate_lazily(ckpt: Path, cfg) -> Weights:
    """``consolidate`` one whole tensor at a time: the rank files are memory-mapped and a tensor
    is concatenated from its shards when asked for, so sharded construction reads a tp/pp
    checkpoint (``train.init_from``) without ever holding it whole."""
    p, family = cfg.parallel, cfg.model.family
    states = []
    for t in range(p.tp):
        if p.pp > 1:
            states.append(_pipeline_rank_state(ckpt, t, cfg.model, mmap=True))
        else:
            f = ckpt / f"mp_rank_{t:02d}_model_states.pt"
            if not f.is_file():
                raise CheckpointError(f"{ckpt}: missing {f.name} (an incomplete checkpoint)")
            states.append(safe_load(f, mmap=True)["module"])

    def shape(name: str) -> tuple[int, ...]:
        dim, s = shard_dim(name, family), list(states[0][name].shape)
        if dim is not None:
            s[dim] = sum(st[name].shape[dim] for st in states)
        return tuple(s)

    return Weights({n: shape(n) for n in states[0]}, lambda name: merge_one(name, states, family).float())
