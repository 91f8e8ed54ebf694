"""Activation checkpointing applied to a single-device model from outside.

The repeated blocks each family's spec names (``FamilySpec.blocks``: GPT ``h``, encoder-decoder
``encoder``/``decoder``) keep their parameter names: only their ``forward`` is wrapped, so
checkpoints and TP plans see the same model with or without it.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module, block_lists: tuple[str, ...]) -> int:
    """Wrap the forward of every block in the ``nn.ModuleList`` attributes ``block_lists`` in
    ``torch.utils.checkpoint``; returns how many were wrapped."""
    n = 0
    for attr in block_lists:
        blocks = getattr(model, attr, None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for block in blocks:
            inner = block.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                # Non-reentrant: works with keyword arguments and with inputs that need no grad.
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            n += 1
    return n
