"""Source encoders: what turns a picture into the sequence an encoder-decoder attends over.

A sequence-to-sequence family reads token ids by default (``model.source: null``). With
``model.source`` set, its source embedding is replaced by one of these encoders, and the rest of
the family (the Transformer or bidirectional-RNN encoder, the decoder, beam search) is unchanged:

- ``kind: image``, ``encoder: cnn``: 3×3 convolutions with ReLU, each followed by 2×2 max
  pooling (Show, Attend and Tell's annotation vectors, in small), then a 1×1 projection to the
  encoder's width; ``encoder: patches``: non-overlapping patches projected linearly (ViT).
  Either way the grid is read in raster order, with 2-D sinusoidal positions added.

Batch contract: ``src`` is (B, channels, size, size) floats in [0, 1]; every image has the same
size, so no row is padded and the encoder output has no mask.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.positions import sinusoidal_grid


class ImageSource(BaseModel):
    """Images as the source of a sequence-to-sequence model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["image"] = "image"
    """What the source is."""
    channels: int = Field(3, ge=1)
    """Colour channels an image must have (3: RGB, 1: grey)."""
    size: int = Field(32, ge=4)
    """Height and width in pixels an image must have."""
    encoder: Literal["cnn", "patches"] = "cnn"
    """``cnn``: convolutions and pooling; ``patches``: linear patch embedding (ViT)."""
    cnn_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    """``cnn``: output channels of each 3×3 convolution; each halves the grid by pooling."""
    patch: int = Field(4, ge=1)
    """``patches``: side of a square patch in pixels."""

    @model_validator(mode="after")
    def _grid(self) -> ImageSource:
        step = self.patch if self.encoder == "patches" else 2 ** len(self.cnn_channels)
        what = "model.source.patch" if self.encoder == "patches" else "2^len(model.source.cnn_channels)"
        if self.size % step:
            raise ValueError(f"model.source.size={self.size} is not divisible by {what}={step}")
        return self

    @property
    def grid(self) -> int:
        """Side of the feature grid the encoder reads (source length = grid²)."""
        return self.size // (self.patch if self.encoder == "patches" else 2 ** len(self.cnn_channels))


class ImageEncoder(nn.Module):
    """(B, C, H, W) images ► (B, grid², d_out) features with 2-D positions."""

    def __init__(self, cfg: ImageSource, d_out: int) -> None:
        super().__init__()
        self.cfg, self.d_out = cfg, d_out
        if cfg.encoder == "patches":
            self.stem = nn.Conv2d(cfg.channels, d_out, cfg.patch, stride=cfg.patch)
        else:
            layers: list[nn.Module] = []
            c = cfg.channels
            for k in cfg.cnn_channels:
                layers += [nn.Conv2d(c, k, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
                c = k
            self.stem = nn.Sequential(*layers, nn.Conv2d(c, d_out, 1))
        self.register_buffer("pe", sinusoidal_grid(cfg.grid, cfg.grid, d_out), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.pe = sinusoidal_grid(self.cfg.grid, self.cfg.grid, self.d_out).to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images).flatten(2).transpose(1, 2)  # raster order: row by row
        return x + self.pe.to(x.dtype)

    def flops_per_image(self) -> float:
        """Training FLOPs of one image (6 per multiply-add of each convolution's weights at
        each output position; pooling and ReLU are not matmuls)."""
        total, side = 0, self.cfg.size
        for m in self.stem.modules() if isinstance(self.stem, nn.Sequential) else (self.stem,):
            if isinstance(m, nn.Conv2d):
                side_out = side // m.stride[0]
                total += 6 * m.weight.numel() * side_out * side_out
                side = side_out
            elif isinstance(m, nn.MaxPool2d):
                side //= 2
        return float(total)

