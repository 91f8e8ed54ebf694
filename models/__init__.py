"""Single-device model definitions. No torch.distributed, no DeepSpeed here.

``build(cfg, seed)`` maps a model config (selected by its ``family`` field) to an ``nn.Module``
whose ``forward(**batch)`` returns the training loss when the batch carries labels.
"""

from __future__ import annotations

from torch import nn

from models.gpt import GPT, GPTConfig

ModelConfig = GPTConfig
"""Union of the model configs; new families join it with their own ``family`` literal."""


def build(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Build the model described by ``cfg`` with deterministic, name-seeded initial weights."""
    if cfg.family == "gpt":
        return GPT(cfg, seed=seed)
    raise ValueError(f"unknown model family {cfg.family!r}")


__all__ = ["GPT", "GPTConfig", "ModelConfig", "build"]
