"""Encoder-decoder Transformer (Vaswani et al. 2017) on ``scaled_dot_product_attention``.

Sinusoidal positions, padding masks on self- and cross-attention, optional shared source/target
embeddings, pre- or post-LayerNorm, label smoothing, and μP (``mup``, ``models/mup.py``; its
embedding multiplier is the base model's √base_width). Single-device code.

Batch contract: ``src`` (B, S) token ids, or with ``model.source`` what its encoder reads
(``models/sources.py``: images); ``tgt_in`` (B, T) = BOS + target, ``labels`` (B, T) = target +
EOS with -100 at padding; padding id ``pad_id`` in token ``src`` and ``tgt_in``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.decoding import decode
from models.fused_qkv import split_heads
from models.init import count_params, fan_in_std, seeded_normal_
from models.loss import TokenCrossEntropy
from models.mup import MuP, MuPWidths, readout
from models.positions import sinusoidal_table
from models.sources import SourceConfig, keep_mask, source_cost, source_encoder


class EncDecConfig(MuPWidths, BaseModel):
    """Shape of an encoder-decoder Transformer."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    # Rank-2 parameters that are not μP's hidden matrices (a vocabulary dimension).
    mup_fixed: ClassVar[tuple[str, ...]] = ("src_embed.weight", "tgt_embed.weight", "out.weight")

    family: Literal["encdec"] = "encdec"
    """Model family."""
    n_enc_layers: int = Field(3, ge=1)
    """Encoder layers."""
    n_dec_layers: int = Field(3, ge=1)
    """Decoder layers."""
    n_head: int = Field(4, ge=1)
    """Attention heads; must divide ``d_model``."""
    d_model: int = Field(128, ge=1)
    """Hidden size."""
    d_ff: int | None = Field(None, ge=1)
    """Feed-forward inner size; ``null`` means ``4 * d_model``."""
    max_seq_len: int = Field(256, ge=1)
    """Longest source or target sequence (sinusoidal table size)."""
    source: SourceConfig | None = None
    """What the encoder reads: ``null``: token ids; else its encoder (``models/sources.py``)."""
    src_vocab_size: int | None = Field(None, ge=2)
    """Source vocabulary; ``null`` takes the source tokenizer's size (unused with ``source``)."""
    tgt_vocab_size: int | None = Field(None, ge=2)
    """Target vocabulary; ``null`` takes the target tokenizer's size."""
    share_embeddings: bool = False
    """One embedding table for source, target and output (needs one shared vocabulary)."""
    tie_output: bool = True
    """Output projection shares the target embedding."""
    norm: Literal["pre", "post"] = "pre"
    """LayerNorm before each sublayer (stable) or after the residual (the 2017 paper)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches."""
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    """Label smoothing of the training loss (0.1 in the paper)."""
    pad_id: int = Field(1, ge=0)
    """Padding token id (the data pipeline's ``<|pad|>``)."""
    init_std: float = Field(0.02, gt=0)
    """Std of the normal init of weights."""
    mup: MuP | None = None
    """The maximal-update parametrisation (``models/mup.py``) for token sources; ``null``: the
    standard one."""

    @model_validator(mode="after")
    def _check(self) -> EncDecConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.share_embeddings and self.source is not None:
            raise ValueError(f"model.share_embeddings needs a token source, not model.source.kind={self.source.kind}")
        if self.share_embeddings and None not in (self.src_vocab_size, self.tgt_vocab_size) \
                and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("model.share_embeddings needs src_vocab_size == tgt_vocab_size")
        if self.mup is not None and self.source is not None:
            raise ValueError(f"model.mup: μP is defined here for token sources; model.source.kind="
                             f"{self.source.kind} has convolutions of its own widths (drop model.mup or model.source)")
        self.check_mup()
        return self

    @property
    def ff_size(self) -> int:
        return self.d_ff or 4 * self.d_model


class Attention(nn.Module):
    """Multi-head attention; ``mask`` is a boolean (B or 1, 1, Tq, Tk) keep-mask or None.

    Self-attention projects q, k and v with one fused matmul (``qkv_proj``); cross-attention
    projects q from the decoder and k, v from the memory (``q_proj``, fused ``kv_proj``). Fused
    rows are head-major (``models/fused_qkv.py``): tensor parallelism cuts them into whole heads.
    """

    def __init__(self, d: int, n_head: int, dropout: float, cross: bool = False,
                 scale: float | None = None) -> None:
        super().__init__()
        self.head_dim, self.dropout, self.cross = d // n_head, dropout, cross
        self.scale = scale  # None: SDPA's 1/√head_dim
        if cross:
            self.q_proj, self.kv_proj = nn.Linear(d, d), nn.Linear(d, 2 * d)
        else:
            self.qkv_proj = nn.Linear(d, 3 * d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor | None,
                causal: bool = False) -> torch.Tensor:
        b, tq, _ = x.shape
        if self.cross:
            (q,) = split_heads(self.q_proj(x), self.head_dim, 1)
            k, v = split_heads(self.kv_proj(mem), self.head_dim, 2)
        else:
            q, k, v = split_heads(self.qkv_proj(x), self.head_dim, 3)
        # Causal without a mask tensor (the decoder's keys are never padded before a real
        # query, see ``decode``): flash attention applies; a padding mask is another kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(b, tq, -1))


class Sublayer(nn.Module):
    """Residual + LayerNorm around a sublayer, pre- or post-norm."""

    def __init__(self, d: int, pre: bool, dropout: float) -> None:
        super().__init__()
        self.norm, self.pre, self.drop = nn.LayerNorm(d), pre, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre:
            return x + self.drop(fn(self.norm(x)))
        return self.norm(x + self.drop(fn(x)))


class FeedForward(nn.Module):
    def __init__(self, d: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, ff), nn.Linear(ff, d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, c: EncDecConfig) -> None:
        super().__init__()
        pre = c.norm == "pre"
        self.self_attn = Attention(c.d_model, c.n_head, c.dropout, scale=c.attn_scale)
        self.ff = FeedForward(c.d_model, c.ff_size, c.dropout)
        self.sub1, self.sub2 = Sublayer(c.d_model, pre, c.dropout), Sublayer(c.d_model, pre, c.dropout)

    def forward(self, x, src_mask):
        x = self.sub1(x, lambda h: self.self_attn(h, h, src_mask))
        return self.sub2(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, c: EncDecConfig) -> None:
        super().__init__()
        pre = c.norm == "pre"
        self.self_attn = Attention(c.d_model, c.n_head, c.dropout, scale=c.attn_scale)
        self.cross_attn = Attention(c.d_model, c.n_head, c.dropout, cross=True, scale=c.attn_scale)
        self.ff = FeedForward(c.d_model, c.ff_size, c.dropout)
        self.sub1, self.sub2, self.sub3 = (Sublayer(c.d_model, pre, c.dropout) for _ in range(3))

    def forward(self, y, mem, tgt_mask, src_mask):
        y = self.sub1(y, lambda h: self.self_attn(h, h, tgt_mask, causal=True))
        y = self.sub2(y, lambda h: self.cross_attn(h, mem, src_mask))
        return self.sub3(y, self.ff)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: EncDecConfig, seed: int = 0) -> None:
        super().__init__()
        if (cfg.source is None and cfg.src_vocab_size is None) or cfg.tgt_vocab_size is None:
            raise ValueError("EncDecConfig vocab sizes must be resolved before building the model")
        self.cfg = cfg
        d = cfg.d_model
        if cfg.source is None:
            self.src_embed = nn.Embedding(cfg.src_vocab_size, d)
        else:
            self.source = source_encoder(cfg.source, d)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, d)
        self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layers))
        pre = cfg.norm == "pre"
        # Pre-norm stacks end un-normalised: a final LayerNorm on each side.
        self.enc_norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.out = nn.Linear(d, cfg.tgt_vocab_size, bias=False)
        if cfg.tie_output:
            self.out.weight = self.tgt_embed.weight
        self.loss_fn = TokenCrossEntropy(cfg.label_smoothing)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from a generator seeded by (seed, parameter name)."""
        self.seed = seed
        for name, p in self.named_parameters():
            self.init_weight(name, p)

    @torch.no_grad()
    def init_weight(self, name: str, t: torch.Tensor) -> None:
        """Fill ``t`` (whole, on the CPU) with the initial value of the parameter ``name``."""
        if t.is_meta:
            return
        if name.endswith(".bias"):
            t.zero_()
        elif "norm" in name:
            t.fill_(1.0)
        elif name.startswith("source."):  # convolutions followed by ReLU or GELU
            seeded_normal_(t, self.seed, name, fan_in_std(t))
        else:
            seeded_normal_(t, self.seed, name, self.cfg.hidden_std(name, self.cfg.init_std))
            if self.cfg.mup and self.cfg.mup.query_zero_init:
                if name.endswith("self_attn.qkv_proj.weight"):  # head-major rows: q, k, v per head
                    t.view(self.cfg.n_head, 3, -1, t.shape[1])[:, 0].zero_()
                elif name.endswith("cross_attn.q_proj.weight"):
                    t.zero_()

    def init_buffers(self, device: torch.device) -> None:
        """Recompute the buffers that are not parameters (after a build on the meta device)."""
        self.pe = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model).to(device)
        if self.cfg.source is not None:
            self.source.init_buffers(device)

    def num_params(self, non_embedding: bool = False) -> int:
        # A set: shared source/target embeddings are subtracted once.
        embeddings = {self.tgt_embed.weight, *([] if self.cfg.source else [self.src_embed.weight])}
        return count_params(self, embeddings if non_embedding else None)

    def flops_per_sample(self, tgt_len: int, src_len: int | None = None) -> float:
        """Training FLOPs of one pair: the encoder over ``src_len`` source tokens (an image: its
        grid after the convolutions; a sound of ``src_len`` samples, by default
        ``model.source.max_seconds``: its frames after the convolutions), the decoder and head
        over ``tgt_len`` tokens, attention counted over whole rows."""
        c = self.cfg
        convs, src_len, source = source_cost(getattr(self, "source", None), src_len, tgt_len)
        # Per source position: the encoder, and each decoder layer's key/value projection of it.
        enc = count_params(self.encoder) + count_params(self.enc_norm) \
            + sum(count_params(layer.cross_attn.kv_proj) for layer in self.decoder)
        dec = self.num_params(non_embedding=True) - enc - source + c.d_model * c.tgt_vocab_size
        attn = 12 * c.d_model * (c.n_enc_layers * src_len ** 2 + c.n_dec_layers * tgt_len * (tgt_len + src_len))
        return float(6 * (enc * src_len + dec * tgt_len) + attn + convs)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per target token of a pair with ``seq_len`` target tokens (and as
        many source tokens)."""
        return self.flops_per_sample(seq_len) / seq_len, float(6 * self.num_params())

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        # μP: the embedding's output stays of one size at every width, √base_width as at the base.
        x = table(ids) * math.sqrt(self.cfg.mup.base_width if self.cfg.mup else self.cfg.d_model)
        # The table stays fp32 (a buffer, recomputed after a meta build); added in fp32 it
        # would promote bf16 activations to fp32 ahead of bf16 norms and projections.
        return self.drop(x + self.pe[: ids.shape[1]].to(x.dtype))

    def encode(self, src: torch.Tensor, src_lengths: list[int] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder states and the (B, 1, 1, S) keep-mask of real source tokens; no mask when
        ``src_lengths`` (host ints, from the batch) say that no row is padded, or for images
        (all of one size). Sounds need their ``src_lengths`` (samples) to mask padding."""
        if self.cfg.source is not None:
            x, lengths = self.source(src, src_lengths)
            x, src_mask = self.drop(x), None
            if lengths is not None and min(lengths) < x.shape[1]:
                src_mask = keep_mask(lengths, x.shape[1], x.device)[:, None, None, :]
        else:
            padded = src_lengths is None or min(src_lengths) < src.shape[1]
            src_mask = (src != self.cfg.pad_id)[:, None, None, :] if padded else None
            x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in: torch.Tensor, mem: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        y = self._embed(self.tgt_embed, tgt_in)
        # Padded target positions are never attended to by real ones under the causal mask
        # (padding only follows the end), so the decoder needs no extra key mask.
        for layer in self.decoder:
            y = layer(y, mem, None, src_mask)
        return self.out(readout(self.cfg, self.dec_norm(y)))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, labels: torch.Tensor | None = None,
                src_lengths: list[int] | None = None):
        mem, src_mask = self.encode(src, src_lengths)
        logits = self.decode(tgt_in, mem, src_mask)
        if labels is None:
            return logits
        return self.loss_fn(logits, labels)

    def decoder_step_fn(self, src: torch.Tensor, src_lengths: list[int] | None = None):
        """``step(rows, prefix) -> next-token log-probs`` over this source batch (for decoding)."""
        mem, src_mask = self.encode(src, src_lengths)

        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            mask = None if src_mask is None else src_mask[rows]
            return self.decode(prefix, mem[rows], mask)[:, -1].float().log_softmax(-1)

        return step

    @torch.no_grad()
    def attention_weights(self, src: torch.Tensor, tgt_in: torch.Tensor,
                          src_lengths: list[int] | None = None) -> torch.Tensor:
        """(B, T, S) attention of each target position over the source, averaged over the
        last decoder layer's heads (for attention maps)."""
        mem, src_mask = self.encode(src, src_lengths)
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder[:-1]:
            y = layer(y, mem, None, src_mask)
        last = self.decoder[-1]
        y = last.sub1(y, lambda h: last.self_attn(h, h, None, causal=True))
        h = last.sub2.norm(y) if last.sub2.pre else y
        attn = last.cross_attn
        (q,) = split_heads(attn.q_proj(h), attn.head_dim, 1)
        k, _ = split_heads(attn.kv_proj(mem), attn.head_dim, 2)
        scores = q @ k.transpose(-1, -2) * (attn.scale or 1 / math.sqrt(attn.head_dim))
        if src_mask is not None:
            scores = scores.masked_fill(~src_mask, float("-inf"))
        return scores.softmax(-1).mean(1)

    @torch.no_grad()
    def translate(self, src: torch.Tensor, bos: int, eos: int, max_len: int = 64,
                  beam: int = 1, length_penalty: float = 1.0, src_lengths: list[int] | None = None) -> list[list[int]]:
        max_len = min(max_len, self.cfg.max_seq_len - 1)
        return decode(self.decoder_step_fn(src, src_lengths), src.shape[0], bos, eos, max_len, beam,
                      length_penalty, src.device)
