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
from models.loss import TokenCrossEntropy, ZLoss
from trainer import checkpoint, distributed, host_memory
from trainer.accounting import comm
from trainer.accounting.flops import PeakFlops
from trainer.config import Config
from trainer.data.build import Data, build_data
from trainer.deepspeed_private import zero3_partitioner
from trainer.engine.initialize import deepspeed_config, initialize, uses_deepspeed
from trainer.parallel import ParallelDims
from trainer.parallel import materialize as mat
from trainer.parallel.activation_checkpointing import apply_activation_checkpointing
from trainer.parallel.context import apply_context_parallel
from trainer.parallel.pipeline import gpt_pipeline, single_device_name
from trainer.parallel.sequence import apply_sequence_parallel
from trainer.parallel.tensor import apply_tensor_parallel

__all__ = ["Data", "Runtime", "build_data", "build_model", "build_module", "setup"]


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
    distributed.init_process_group(cfg.collective_timeout_s())
    if uses_deepspeed(cfg, distributed.world_size()):
        distributed.quiet_deepspeed()
    dims = ParallelDims(cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp, distributed.rank(), cfg.parallel.cp)
    if dims.tp * dims.pp > 1:
        dims.grid  # noqa: B018 (creates the process groups: a collective)
    dims.cp_group  # noqa: B018 (likewise)
    if dims.world_size > 1:
        comm.install(dims)
    device = distributed.device()
    distributed.configure_matmul(cfg.train.tf32, device)
    host_memory.configure(cfg.train.host_allocator, device)
    return Runtime(cfg, dims, device)


def _stage(cfg: Config, dims: ParallelDims) -> torch.nn.Module:
    """This pipeline stage's layers with their initial weights, each cut to its tensor-parallel
    slices as soon as it is built: a rank holds its slices and one whole layer, never its stage
    (DeepSpeed's ``PipelineModule`` moves and synchronises layers as it builds them, which meta
    tensors cannot do). With ``train.init_from`` the stage is built whole, loaded, then cut."""
    def shard(layer: torch.nn.Module) -> None:
        apply_tensor_parallel(layer, cfg.family.tp_plan, dims.tp_group)
        host_memory.release_freed_memory()  # the whole layer's pages (materialize.py says why)

    cut = shard if dims.tp > 1 and not cfg.train.init_from else None
    model = gpt_pipeline(cfg.model, dims.topology, cfg.train.seed, cfg.train.activation_checkpointing, cut)
    if cfg.train.init_from:
        checkpoint.load_weights(model, cfg.train.init_from, lambda n: single_device_name(n, cfg.model),
                                label=f"train.init_from={cfg.train.init_from!r}", model_cfg=cfg.model)
    _parallelize(cfg, dims, model)  # the rest: the loss, the random-number regions
    return model


def _parallelize(cfg: Config, dims: ParallelDims, model: torch.nn.Module) -> None:
    """Tensor (and sequence) parallelism, context parallelism: module swaps that keep every
    parameter's name, so checkpoints and the initial values do not depend on them."""
    spec = cfg.family
    if cfg.parallel.sequence_parallel:
        apply_sequence_parallel(model, spec.tp_plan, spec.sp_plan, dims.tp_group, getattr(cfg.model, spec.head_vocab))
    elif dims.tp > 1:
        apply_tensor_parallel(model, spec.tp_plan, dims.tp_group, spec.tp_rng_regions,
                              getattr(cfg.model, spec.head_vocab))
    if dims.cp > 1:
        apply_context_parallel(model, dims.cp_group)
        if dims.rank == 0:
            n = cfg.data.seq_len
            print(f"context parallel: each of {dims.cp} ranks holds {n // dims.cp} of every {n} tokens "
                  f"and {cfg.model.n_head // dims.cp} of {cfg.model.n_head} heads in attention", flush=True)


def _sharded(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """The model built on the meta device, tensor-parallel there, then materialised one
    parameter at a time straight onto the rank's device, in the training precision: this
    rank's slices, and under ZeRO-3 its partition of them (``trainer/parallel/materialize.py``).
    Never a whole fp32 copy on the host: data-parallel ranks of a 7B model would each hold one
    (28 GB, eight per node) before DeepSpeed cast and moved it."""
    with mat.on_meta():
        model = models.build(cfg.model, seed=cfg.train.seed)
    _parallelize(cfg, dims, model)
    values = mat.initial_values(model)
    if cfg.train.init_from:
        label = f"train.init_from={cfg.train.init_from!r}"
        stored = checkpoint.read_weights(cfg.train.init_from, label, cfg.model)
        pairs = checkpoint.match_weights(model, stored, label=label, shape_of=mat.whole_shape)
        source = {n: src for _, n, src in pairs}
        values = lambda name, shape: stored[source[name]]  # noqa: E731
    # DeepSpeed would cast the model itself (the same rounding, before its fp32 masters are
    # copied from the 16-bit weights); made in that dtype, no fp32 copy ever exists.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    partition = None
    if cfg.parallel.zero_stage == 3:  # DeepSpeed takes a model partitioned here as it is
        partition = zero3_partitioner(deepspeed_config(cfg), dims.dp_group)
    return mat.materialize(model, values, device, dtype, partition)


def _initial_model(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """This rank's part of the model with its initial weights (name-seeded, or
    ``train.init_from``'s); a resumed run then overrides them from its checkpoint."""
    if dims.pp > 1:
        model = _stage(cfg, dims)
    elif mat.supported(cfg.family.model):  # every layout: slices, partitions or the whole model
        model = _sharded(cfg, dims, device)
    else:  # a small recurrent baseline: built whole
        model = models.build(cfg.model, seed=cfg.train.seed)
        if cfg.train.init_from:
            checkpoint.load_weights(model, cfg.train.init_from, label=f"train.init_from={cfg.train.init_from!r}")
        _parallelize(cfg, dims, model)
    if cfg.train.init_from and dims.rank == 0:
        print(f"initialised from {cfg.train.init_from}", flush=True)
    return model


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """This rank's part of the model with its initial weights, then what is applied from outside
    (tensor parallelism, activation checkpointing, compile), in that order; DeepSpeed wraps it
    afterwards.

    Every layout starts from the numbers of the single-device model: weights are seeded per
    parameter name, and a rank materialises only what it keeps (``_initial_model``).
    """
    model = _initial_model(cfg, dims, device)
    chunk = cfg.loss_chunk_tokens()
    for m in model.modules():  # the loss modules, after tensor or context parallelism swapped them
        if isinstance(m, ZLoss):
            m.z_loss = cfg.train.z_loss
        if isinstance(m, TokenCrossEntropy):
            m.chunk_tokens = chunk
    # Dropout streams start here, whatever construction drew from the global generator (a
    # whole build's default initialisers do; a meta build draws nothing).
    torch.manual_seed(cfg.train.seed)
    model = model.to(device)
    if cfg.train.activation_checkpointing and dims.pp == 1:  # the pipeline checkpoints its own layers

        apply_activation_checkpointing(model, cfg.family.blocks)
    if cfg.train.compile:
        # Inductor's compiled kernels persist beside our data cache (not in /tmp, which
        # reboots and clusters' job cleanup wipe): a second start reuses them in seconds.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cfg.data.resolved_cache_dir() / "inductor"))
        model.compile()  # in place: parameter names (and so checkpoints) unchanged
    return model


def whole_model(cfg: Config, model: torch.nn.Module, dims: ParallelDims) -> torch.nn.Module:
    """The whole model for counts and FLOPs: ``model`` itself, or its meta-device reference
    when this rank holds only a shard, a stage or a ZeRO-3 partition."""
    return mat.reference_model(cfg) if dims.tp * dims.pp > 1 or cfg.parallel.zero_stage == 3 else model


def build_module(cfg: Config, model: torch.nn.Module, dims: ParallelDims, device: torch.device):
    """DeepSpeed over ``model`` (always the last wrapper), as a train module that knows the
    model's FLOPs per token and the device's peak (MFU)."""
    flops_per_token, _ = whole_model(cfg, model, dims).flops_per_token(cfg.data.seq_len)
    peak = PeakFlops(device, cfg.train.precision, cfg.train.peak_tflops)
    return initialize(model, cfg, dims, device, flops_per_token, peak)
