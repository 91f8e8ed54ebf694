"""Initialisation helpers shared by all model families."""

from __future__ import annotations

import zlib

import torch
from torch import nn


def param_seed(seed: int, name: str) -> int:
    """A stable per-parameter seed (crc32 of the name, not Python's salted ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def seeded_normal_(t: torch.Tensor, seed: int, name: str, std: float) -> torch.Tensor:
    """Fill ``t`` with N(0, std²) drawn from a generator seeded by (seed, name), on the CPU.

    Drawing on the CPU and copying keeps the numbers identical whatever the device.
    """
    g = torch.Generator().manual_seed(param_seed(seed, name))
    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(std))
    return t


def fan_in_std(t: torch.Tensor) -> float:
    """He initialisation's std for a convolution or linear weight followed by a ReLU."""
    return (2.0 / t[0].numel()) ** 0.5


def count_params(module: nn.Module, exclude: set[torch.Tensor] | None = None) -> int:
    """Parameters counted once (tied weights once), minus the tensors in ``exclude``."""
    return sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in (exclude or ()))


@torch.no_grad()
def init_matrices_(module: nn.Module, seed: int, std: float) -> None:
    """Every weight matrix N(0, std²) seeded by its name; vectors (biases) zero, a norm's gain one."""
    for name, p in module.named_parameters():
        if p.dim() > 1:
            seeded_normal_(p.data, seed, name, std)
        elif "norm" in name and name.endswith("weight"):
            nn.init.ones_(p)
        else:
            nn.init.zeros_(p)
