"""The public builders of a run, in the order every rank calls them:

``setup`` (environment, resolved config, process group and groups) ► ``build_data``
(``trainer/data/build.py``: batches and the config finished from the tokenizers) ►
``build_model`` (single-device model, then what is applied from outside) ► ``build_module``
(DeepSpeed, wrapped in a train module). ``seqtrain train`` and ``seqtrain bench`` both use them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

import models
from trainer import checkpoint, distributed, host_memory
from trainer.config import Config
from trainer.data.build import Data, build_data
from trainer.engine import uses_deepspeed
from trainer.parallel import ParallelDims

__all__ = ["Data", "Runtime", "build_data", "build_model", "build_module", "reference_model", "setup"]


class Runtime(NamedTuple):
    cfg: Config
    """The config resolved for the world size (dp, accumulation, global batch)."""
    dims: ParallelDims
    """Degrees, this rank's coordinates and its process groups."""
    device: torch.device


def setup(cfg: Config) -> Runtime:
    """Validate the layout before any process group exists, then join it and build the groups
    (a collective: the same point on every rank)."""
    distributed.setup_environment()
    cfg = cfg.resolve(distributed.world_size())  # raises ConfigError before any rendezvous
    distributed.init_process_group()
    if uses_deepspeed(cfg, distributed.world_size()):
        distributed.quiet_deepspeed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, distributed.rank())
    if dims.tp * dims.pp > 1:
        dims.grid  # noqa: B018 (creates the process groups: a collective)
    device = distributed.device()
    host_memory.configure(cfg.train.host_allocator, device)
    return Runtime(cfg, dims, device)


def reference_model(cfg: Config) -> torch.nn.Module:
    """The whole single-device model on the meta device (no memory, no init): for parameter
    counts and FLOPs when this rank holds only a shard or a stage of it, and for the scaling
    planner.

    Built under ``torch.device("meta")``, not accelerate's ``init_empty_weights``: that one
    re-registers every parameter as it is assigned, which unties tied weights (the GPT's head
    and embedding), so tied models would count their embedding twice.
    """
    with torch.device("meta"):
        return models.build(cfg.model, seed=cfg.train.seed)


def _initial_model(cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    """The model (or this pipeline stage's layers) with its initial weights: name-seeded, or
    ``train.init_from``'s. A resumed run then overrides them from its checkpoint."""
    if dims.pp > 1:
        from trainer.parallel.pipeline import gpt_pipeline, single_device_name

        model = gpt_pipeline(cfg.model, dims.topology, cfg.train.seed, cfg.train.activation_checkpointing)
        rename = lambda n: single_device_name(n, cfg.model)  # noqa: E731
    else:
        model, rename = models.build(cfg.model, seed=cfg.train.seed), None
    if cfg.train.init_from:
        checkpoint.load_weights(model, cfg.train.init_from, rename, label=f"train.init_from={cfg.train.init_from!r}")
        if dims.rank == 0:
            print(f"initialised from {cfg.train.init_from}", flush=True)
    return model


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """The model with its initial weights, then what is applied from outside (tensor
    parallelism, activation checkpointing, compile), in that order; DeepSpeed wraps it afterwards.

    Every rank builds the whole model (or its pipeline stage's layers) from the same
    name-seeded weights on the CPU, then keeps its tensor-parallel slice: every layout starts
    from the numbers of the single-device model.
    """
    torch.manual_seed(cfg.train.seed)  # dropout streams; weights are seeded per parameter name
    spec = cfg.family
    model = _initial_model(cfg, dims)
    if dims.tp > 1:
        from trainer.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, spec.tp_plan, dims.tp_group, spec.tp_rng_regions,
                              getattr(cfg.model, spec.head_vocab))
    model = model.to(device)
    if cfg.train.activation_checkpointing and dims.pp == 1:  # the pipeline checkpoints its own layers
        from trainer.parallel.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, spec.blocks)
    if cfg.train.compile:
        # Inductor's compiled kernels persist beside our data cache (not in /tmp, which
        # reboots and clusters' job cleanup wipe): a second start reuses them in seconds.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cfg.data.resolved_cache_dir() / "inductor"))
        model.compile()  # in place: parameter names (and so checkpoints) unchanged
    return model


def whole_model(cfg: Config, model: torch.nn.Module, dims: ParallelDims) -> torch.nn.Module:
    """The whole model for counts and FLOPs: ``model`` itself, or its meta-device reference
    when this rank holds only a shard or a stage."""
    return reference_model(cfg) if dims.tp * dims.pp > 1 else model


def build_module(cfg: Config, model: torch.nn.Module, dims: ParallelDims, device: torch.device):
    """DeepSpeed over ``model`` (always the last wrapper), as a train module that knows the
    model's FLOPs per token and the device's peak (MFU)."""
    from trainer import engine
    from trainer.flops import PeakFlops

    flops_per_token, _ = whole_model(cfg, model, dims).flops_per_token(cfg.data.seq_len)
    peak = PeakFlops(device, cfg.train.precision, cfg.train.peak_tflops)
    return engine.initialize(model, cfg, dims, device, flops_per_token, peak)
