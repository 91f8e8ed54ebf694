"""Attention maps of an image captioner as PNG files: where the decoder looked for each word."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from tokenizers import Tokenizer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@torch.no_grad()
def attention_png(model: torch.nn.Module, tok: Tokenizer, image: np.ndarray, ids: list[int], eos: int,
                  path: Path) -> Path:
    """``image`` (C, H, W) and, for each token of ``ids`` (its caption) and the final EOS, the
    decoder's attention over the encoder's grid (teacher-forced on ``ids``), upsampled over the
    picture. One row of panels; written to ``path``."""
    grid = model.cfg.source.grid
    tgt_in = torch.tensor([[eos, *ids]])
    weights = model.attention_weights(torch.from_numpy(image)[None], tgt_in)[0].float().numpy()  # (T, S)
    words = [tok.decode([i]).strip() or "·" for i in ids] + ["<end>"]
    picture = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    h, w = picture.shape[:2]
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.6 * (len(words) + 1), 2.0))
    axes[0].imshow(picture, cmap=None if picture.ndim == 3 else "gray")
    axes[0].set_title("image", fontsize=8)
    for ax, word, row in zip(axes[1:], words, weights, strict=True):
        ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray")
        ax.imshow(row.reshape(grid, grid), cmap="magma", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear")
        ax.set_title(word, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(tok.decode(ids), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
