"""Sinusoidal position tables: over a sequence (Vaswani et al. 2017) and over an image grid."""

from __future__ import annotations

import math

import torch


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv[: d // 2])
    return pe


def sinusoidal_grid(h: int, w: int, d: int) -> torch.Tensor:
    """(h·w, d) in raster order: the first half of the channels encodes the row, the second
    half the column, so "left of" and "above" are each read from their own channels."""
    half = d // 2
    rows = sinusoidal_table(h, half)[:, None, :].expand(h, w, half)
    cols = sinusoidal_table(w, d - half)[None, :, :].expand(h, w, d - half)
    return torch.cat([rows, cols], -1).reshape(h * w, d)
