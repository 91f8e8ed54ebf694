"""The engine: our config ► a DeepSpeed config, AdamW, LR schedule, ``deepspeed.initialize``
► a train module (``trainer/engine/train_module.py``). A run of one process in fp32 without ZeRO,
tensor or pipeline parallelism gets the same engine in plain PyTorch
(``trainer/engine/local.py``) unless ``train.engine=deepspeed``: it never imports DeepSpeed."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer import deepspeed_private as ds_private
from trainer import distributed
from trainer.config import Config
from trainer.engine.local import LocalEngine
from trainer.engine.nonfinite import NonFiniteGuard
from trainer.engine.train_module import EngineModule, PipelineModule
from trainer.parallel import ParallelDims


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config implied by ours (``cfg`` must be resolved)."""
    t, p = cfg.train, cfg.parallel
    ds: dict[str, Any] = {
        # DeepSpeed counts the cp ranks of a replica as data ranks (dims.py says why), each with
        # its own micro-batch: in its arithmetic the global batch is cp times ours.
        "train_batch_size": t.global_batch_size * p.cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_config(cfg),
        "steps_per_print": 2**31 - 1,  # we log ourselves, on rank 0 only
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if p.zero_stage or t.grad_accum_dtype == "bf16":
            # (Without ZeRO DeepSpeed refuses fp32; ``Config.resolve`` refuses the steps that
            # would accumulate in bf16 there unasked.)
            ds["data_types"] = {"grad_accum_dtype": t.grad_accum_dtype}
    elif t.precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow (the step is skipped), grow after
        # 1000 clean steps.
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def zero_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section: the stage and the bucket and overlap keys of
    ``parallel`` (the planner sizes the same buffers, ``trainer/accounting/planner.py``)."""
    p = cfg.parallel
    z: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 0:
        return z
    bucket = cfg.zero_bucket_elements()
    z.update(overlap_comm=p.zero_overlap_comm, contiguous_gradients=p.zero_contiguous_gradients,
             reduce_bucket_size=bucket)
    if p.zero_stage in (1, 2):
        z["allgather_bucket_size"] = bucket
    else:
        z["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
    return z


def param_groups(model: nn.Module, weight_decay: float, lr: float = 1.0,
                 lr_mult: Callable[[str, int], float] | None = None) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never biases or norm gains. ``lr_mult``
    (the model config's, under μP) splits them further by learning-rate factor: each group's
    ``lr`` is ``lr · lr_mult`` and it keeps the factor as ``lr_mult``. Groups are found by
    parameter name and rank, so a tensor shard or a pipeline stage's copy of a parameter lands
    in its group; empty groups are dropped, so stages may hold different numbers of groups."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # A parameter ZeRO-3 partitioned at construction is empty here; its shape is ds_shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            mult = lr_mult(name, ndim) if lr_mult else 1.0
            groups.setdefault((ndim >= 2, mult), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult, "lr_mult": mult}
        for (decay, mult), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))
        if params or (lr_mult is None)  # the standard parametrisation keeps its two groups
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    impl = t.optimizer_impl
    if impl == "auto":
        # Fused (one kernel per dtype/device group) wherever torch has it: CUDA, and CPU since
        # torch 2.4, where it beats foreach by a wide margin (docs/benchmarks.md); foreach
        # elsewhere (MPS, XPU builds without it).
        impl = "fused" if next(model.parameters()).device.type in ("cuda", "cpu") else "foreach"
    lr_mult = cfg.model.lr_mult if getattr(cfg.model, "mup", None) else None
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.lr, lr_mult), lr=t.lr, betas=t.betas, eps=t.eps,
        fused=impl == "fused", foreach=impl == "foreach",
    )


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule for every group, as a factor on the group's own rate (μP's factors hold)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.train.lr)


def uses_deepspeed(cfg: Config, world_size: int) -> bool:
    """Whether this run needs DeepSpeed's engine: more than one process, ZeRO, tensor or
    pipeline parallelism, fp16/bf16 (DeepSpeed's mixed-precision optimizers), or
    ``train.engine=deepspeed``."""
    p = cfg.parallel
    return (cfg.train.engine == "deepspeed" or world_size > 1 or p.zero_stage > 0 or p.tp > 1
            or p.pp > 1 or cfg.train.precision != "fp32")


def initialize(model: nn.Module, cfg: Config, dims: ParallelDims, device: torch.device,
               flops_per_token: float = 0.0, peak=None):
    """``deepspeed.initialize`` (always the last wrapper applied), wrapped in the train module
    of its kind.

    A ``PipelineModule`` gives a pipeline engine, which builds its groups from the module's
    topology (passing ``mpu`` too is refused); tensor parallelism alone passes our grid as
    ``mpu`` so DeepSpeed reduces gradients over data-parallel ranks only.
    """
    opt = build_optimizer(model, cfg)
    guard = None
    if cfg.train.nonfinite_patience:
        guard = NonFiniteGuard(opt)  # wraps opt.step, so before the scheduler hooks it too
    sched = build_scheduler(opt, cfg)
    if not uses_deepspeed(cfg, dims.world_size):
        engine = LocalEngine(model, opt, sched, deepspeed_config(cfg))
        return _counting(EngineModule(engine, sched, dims, device, guard, flops_per_token, peak), cfg)
    import deepspeed

    distributed.quiet_deepspeed()
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg), mpu=dims.mpu,
    )
    ds_private.undo_initial_optimizer_step(engine.optimizer)
    kind = PipelineModule if dims.pp > 1 else EngineModule
    return _counting(kind(engine, sched, dims, device, guard, flops_per_token, peak), cfg)


def _counting(module, cfg: Config):
    """The family's work units count a batch's "tokens" (nodes of trees, say)."""
    if cfg.family.units is not None:
        module.units = functools.partial(cfg.family.units, model=cfg.model)
    return module
