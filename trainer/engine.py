"""DeepSpeed engine: our config ► a DeepSpeed config, AdamW, LR schedule, ``deepspeed.initialize``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import Config


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config implied by ours (``cfg`` must be resolved)."""
    t, p = cfg.train, cfg.parallel
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "steps_per_print": 2**31 - 1,  # we log ourselves, on rank 0 only
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow (the step is skipped), grow after
        # 1000 clean steps.
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never biases or norm gains."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    impl = t.optimizer_impl
    if impl == "auto":
        # Fused (one kernel for all params) on CUDA; the multi-tensor foreach path on CPU.
        impl = "fused" if next(model.parameters()).is_cuda else "foreach"
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps,
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
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.train.lr)


def initialize(model: nn.Module, cfg: Config):
    """``deepspeed.initialize`` (always the last wrapper applied): returns (engine, scheduler)."""
    import deepspeed

    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg)
    )
    _record_fp32_grad_norm(engine)
    return engine, sched


def _record_fp32_grad_norm(engine) -> None:
    """Keep the gradient norm on the plain fp32 path (no ZeRO, no fp16/bf16).

    There DeepSpeed clips with its own ``clip_grad_norm_`` (model-parallel aware) but drops the
    norm it returns, so ``get_global_grad_norm()`` would be None; we keep it instead of
    computing a second norm over all gradients.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_and_record
