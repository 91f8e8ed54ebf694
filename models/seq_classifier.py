"""Sequence classifiers: one label per token sequence, read by an LSTM or a Transformer encoder.

The sequential baselines of tree-shaped tasks (ListOps: Nangia & Bowman 2018): the model sees
the expression's tokens left to right, brackets included, and never its tree.

- ``lstm``: ``nn.LSTM`` over the packed sequence; the top layer's final state is classified
  (the paper's LSTM baseline reads the sequence the same way).
- ``transformer``: ``nn.TransformerEncoder`` (pre-norm) over the tokens plus learned positions,
  padding masked; the mean of the valid tokens' states is classified.

A batch is ``input_ids`` (B, T) padded with ``pad_id``, ``lengths`` (host list) and ``labels`` (B).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.init import count_params, init_matrices_


class SeqClassifierConfig(BaseModel):
    """An LSTM or Transformer encoder classifying whole token sequences."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    family: Literal["seq_classifier"] = "seq_classifier"
    """Model family."""
    encoder: Literal["lstm", "transformer"] = "lstm"
    """``lstm``: final state of a left-to-right LSTM; ``transformer``: mean-pooled encoder."""
    vocab_size: int | None = Field(None, ge=2)
    """Input tokens, padding included; null: the task's."""
    n_classes: int | None = Field(None, ge=2)
    """Labels; null: the task's."""
    pad_id: int | None = None
    """Padding token (the last id); null: the task's."""
    d_model: int = Field(128, ge=1)
    """Embedding and state size (the LSTM's hidden size, the Transformer's width)."""
    n_layers: int = Field(1, ge=1)
    """Stacked LSTM layers or Transformer blocks."""
    n_heads: int = Field(4, ge=1)
    """Transformer: attention heads."""
    d_ff: int = Field(512, ge=1)
    """Transformer: feed-forward width."""
    max_len: int = Field(512, ge=1)
    """Transformer: learned positions (the longest sequence it reads)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout inside the encoder and before the classifier."""
    init_std: float = Field(0.1, gt=0)
    """Std of the normal init of the weight matrices."""


class SeqClassifier(nn.Module):
    def __init__(self, cfg: SeqClassifierConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None or cfg.n_classes is None or cfg.pad_id is None:
            raise ValueError("SeqClassifierConfig.vocab_size, n_classes and pad_id must be resolved first")
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        if cfg.encoder == "lstm":
            self.encoder = nn.LSTM(d, d, cfg.n_layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        else:
            self.pos = nn.Embedding(cfg.max_len, d)
            block = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(block, cfg.n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d, cfg.n_classes)
        init_matrices_(self, seed, cfg.init_std)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()

    def num_params(self) -> int:
        return count_params(self)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per input token: 6 × the encoder's weights, plus the Transformer's
        attention scores and weighted sum (12 · layers · width · ``seq_len``); the classifier
        runs once per sequence and is not counted."""
        n = sum(p.numel() for p in self.encoder.parameters() if p.dim() > 1)
        attn = 12 * self.cfg.n_layers * self.cfg.d_model * seq_len if self.cfg.encoder == "transformer" else 0
        return float(6 * n + attn), float(6 * self.num_params())

    def features(self, input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """One vector per sequence."""
        x = self.embed(input_ids)
        if self.cfg.encoder == "lstm":
            packed = pack_padded_sequence(self.drop(x), torch.as_tensor(lengths), batch_first=True,
                                          enforce_sorted=False)
            _, (h, _) = self.encoder(packed)
            return h[-1]
        n = input_ids.shape[1]
        if n > self.cfg.max_len:
            raise ValueError(f"a sequence of {n} tokens is longer than model.max_len={self.cfg.max_len}")
        # The mask is built from the host lengths: no read of the device.
        valid = torch.arange(n).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)
        valid = valid.to(x.device)
        x = self.drop(x + self.pos.weight[:n])
        h = self.norm(self.encoder(x, src_key_padding_mask=~valid))
        w = valid.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1)

    def forward(self, input_ids: torch.Tensor, lengths: list[int], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits per sequence, or with ``labels`` the mean cross-entropy."""
        logits = self.head(self.drop(self.features(input_ids, lengths)))
        return logits if labels is None else F.cross_entropy(logits.float(), labels)
