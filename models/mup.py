"""μP, the maximal-update parametrisation (Yang et al. 2022, "Tensor Programs V"), shared by the
Transformer families: the option block ``MuP`` and the multipliers a config derives from it.

A family's config mixes in ``MuPWidths`` (it has ``d_model``, ``n_head`` and ``mup``) and names
its width-independent matrices in ``mup_fixed``; its model applies ``attn_scale`` in attention,
``readout`` before the output head, and scales hidden matrices' init by ``hidden_std``. The
optimizer takes ``lr_mult`` per parameter (``trainer/engine/initialize.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch


class MuP(BaseModel):
    """μP for Adam ("Tensor Programs V", Table 3), relative to a base model ``base_width`` wide,
    at which it is exactly the standard parametrisation. With ``m = d_model / base_width``:
    hidden matrices (everything of rank 2 but the embeddings and the output head) start with
    std ``init_std / √m`` and learn at ``lr / m``; embeddings, the head, biases and norm gains
    keep ``init_std`` and ``lr``; the logits are multiplied by ``output_mult / m``; attention
    scores are ``q·k · attn_mult / head_dim`` rather than ``q·k / √head_dim``. AdamW's decoupled
    weight decay is ``lr · weight_decay`` per group, so it scales with the group's rate."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_width: int = Field(ge=1)
    """``d_model`` of the base model the learning rate and init were tuned at (≤ ``d_model``)."""
    output_mult: float = Field(1.0, gt=0)
    """Logits are ``head(h) · output_mult · base_width / d_model``."""
    attn_mult: float | None = Field(None, gt=0)
    """Attention scores are ``q·k · attn_mult / head_dim``; ``null``: ``√(base_width / n_head)``,
    which is the standard ``1/√head_dim`` at the base width (heads kept, head size growing)."""
    query_zero_init: bool = False
    """Start the query projections at zero (as Yang et al. do for GPT-3): attention is uniform at
    first at every width, where random queries give scores shrinking as ``1/√head_dim``; its
    scores are then the learned part alone. (At the base width μP then differs from SP here.)"""


class MuPWidths:
    """μP's multipliers for a config with ``d_model``, ``n_head`` and ``mup: MuP | None``; all of
    them are the standard parametrisation's when ``mup`` is None."""

    mup_fixed: ClassVar[tuple[str, ...]] = ()
    """Suffixes of the rank-2 parameters that are not hidden matrices: one dimension (vocabulary
    or positions) stays fixed as the width grows, so they keep the base init and learning rate."""

    def check_mup(self) -> None:
        """For the config's validator: a base wider than the model is no μP of it."""
        if self.mup is not None and self.mup.base_width > self.d_model:
            raise ValueError(
                f"model.mup.base_width={self.mup.base_width} is wider than model.d_model={self.d_model}; "
                f"μP widens a base model: use a base_width of at most {self.d_model}"
            )

    @property
    def width_mult(self) -> float:
        """μP's ``m = d_model / base_width`` (1 in the standard parametrisation)."""
        return self.d_model / self.mup.base_width if self.mup else 1.0

    @property
    def attn_scale(self) -> float | None:
        """Attention's score scale; ``None``: SDPA's default ``1/√head_dim``."""
        if self.mup is None:
            return None
        mult = self.mup.attn_mult or math.sqrt(self.mup.base_width / self.n_head)
        return mult / (self.d_model // self.n_head)

    @property
    def readout_mult(self) -> float:
        """Factor on the logits (μP's ``output_mult / m``; 1 in the standard parametrisation)."""
        return self.mup.output_mult / self.width_mult if self.mup else 1.0

    def is_hidden(self, name: str) -> bool:
        """Whether the rank-2 parameter ``name`` is a hidden matrix (both dimensions grow)."""
        return not name.endswith(self.mup_fixed)

    def hidden_std(self, name: str, std: float) -> float:
        """The init std of the rank-2 parameter ``name`` whose standard std is ``std``: μP divides
        hidden matrices' by ``√m`` (variance ∝ 1/fan_in) and keeps the others'."""
        return std / math.sqrt(self.width_mult) if self.is_hidden(name) else std

    def lr_mult(self, name: str, ndim: int) -> float:
        """Factor on the learning rate of the parameter ``name`` of rank ``ndim`` (μP: ``1/m`` for
        hidden matrices). Any layout's name of it does: only its suffix is read."""
        if self.mup is None or ndim < 2 or not self.is_hidden(name):
            return 1.0
        return 1.0 / self.width_mult


def readout(cfg: MuPWidths, h: torch.Tensor) -> torch.Tensor:
    """The final norm's output as the head reads it: μP's logit multiplier is applied here, before
    the (bias-free) head, so every path to the logits (whole, chunked in the loss, a pipeline's
    last stage, vocabulary shards) gets it. The standard parametrisation's ``h`` is untouched."""
    return h * cfg.readout_mult if cfg.mup else h
