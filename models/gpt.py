"""GPT: a decoder-only Transformer (pre-LayerNorm, causal SDPA, learned positions, tied embeddings).

Single-device code, readable top to bottom. Parameter names follow Hugging Face GPT-2 (``wte``,
``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` ...); the fused q/k/v projection ``c_attn`` orders its
rows head by head (``models/fused_qkv.py``) so that tensor parallelism cuts it into whole heads.
With ``bias=True`` and ``norm_eps=1e-5`` it computes exactly what ``GPT2LMHeadModel`` computes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.fused_qkv import split_heads
from models.init import seeded_normal_
from models.loss import TokenCrossEntropy


class GPTConfig(BaseModel):
    """Shape of a GPT model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    family: Literal["gpt"] = "gpt"
    """Model family; selects the class in ``models.build``."""
    n_layer: int = Field(4, ge=1)
    """Number of Transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide ``d_model``."""
    d_model: int = Field(128, ge=1)
    """Hidden size."""
    d_ff: int | None = Field(None, ge=1)
    """MLP inner size; ``null`` means ``4 * d_model``."""
    max_seq_len: int = Field(256, ge=1)
    """Number of learned positions (the longest context the model accepts)."""
    vocab_size: int | None = Field(None, ge=2)
    """Embedding rows; ``null`` takes the tokenizer's vocabulary size."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    norm_eps: float = Field(1e-5, gt=0)
    """LayerNorm epsilon."""
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    """MLP non-linearity: ``gelu_tanh``, GPT-2's tanh approximation (``gelu_new`` in transformers),
    or ``gelu``, the exact erf form (nanoGPT's; cheaper than the tanh form on a CPU)."""
    init_std: float = Field(0.02, gt=0)
    """Std of the normal init; residual output projections use ``init_std / sqrt(2 * n_layer)``."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        return self

    @property
    def ff_size(self) -> int:
        return self.d_ff or 4 * self.d_model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.head_dim = d // cfg.n_head
        self.dropout = cfg.dropout
        # One matmul for q, k and v: under tensor parallelism one column-parallel input (one
        # all-reduce of its gradient) instead of three.
        self.c_attn = nn.Linear(d, 3 * d, bias=cfg.bias)
        self.c_proj = nn.Linear(d, d, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # Heads and length from the projection, not the config or ``x``: under tensor
        # parallelism each rank holds n_head / tp heads, and under sequence parallelism ``x`` is
        # 1/tp of the sequence the projection gathers; the same code runs unchanged.
        q, k, v = split_heads(self.c_attn(x), self.head_dim, 3)
        t = q.shape[2]
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        # A cached prefix makes the query block shorter than the keys: causal masking then needs
        # an explicit offset mask (is_causal aligns to the top-left corner).
        if kv_cache is None or t == 1:
            mask, causal = None, kv_cache is None
        else:
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).flatten(2)
        return self.resid_drop(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.ff_size, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ff_size, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache=None):
        a, new_cache = self.attn(self.ln_1(x), kv_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


# Output projections of residual branches get the GPT-2 scaled init.
RESIDUAL_PROJ_SUFFIXES = ("attn.c_proj.weight", "mlp.c_proj.weight")


@torch.no_grad()
def init_param_(name: str, p: torch.Tensor, cfg: GPTConfig, seed: int) -> None:
    """Initial value of the parameter called ``name`` (its name in ``GPT``), from (seed, name) alone.

    Independent of construction order and of which other layers exist, so a pipeline stage that
    builds only its own layers starts from the same numbers as the full model.
    """
    if p.is_meta:
        return
    if name.endswith(".bias"):
        p.zero_()
    elif ".ln_" in name or name.startswith("ln_"):
        p.fill_(1.0)
    else:
        std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith(RESIDUAL_PROJ_SUFFIXES) else cfg.init_std
        seeded_normal_(p, seed, name, std)


class GPT(nn.Module):
    """Decoder-only language model. ``forward(input_ids, labels)`` returns the mean token loss."""

    def __init__(self, cfg: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.loss_fn = TokenCrossEntropy()
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from a generator seeded by (seed, parameter name)."""
        self.seed = seed
        for name, p in self.named_parameters():
            self.init_weight(name, p)

    def init_weight(self, name: str, t: torch.Tensor) -> None:
        """Fill ``t`` (whole, on the CPU) with the initial value of the parameter ``name``: what
        sharded construction (``trainer/parallel/materialize.py``) calls one parameter at a time."""
        init_param_(name, t, self.cfg, self.seed)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non-embedding excludes token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per token: (exact-ish, 6N approximation).

        Matmul FLOPs only (forward 2 per multiply-add, backward twice forward): 6 * non-embedding
        params + 6 * lm_head (the output projection is a matmul even when tied) + attention
        scores and weighted sum, 12 * n_layer * d_model * seq_len (nanoGPT / PaLM appendix B).
        """
        c = self.cfg
        n_nonemb = self.num_params(non_embedding=True)
        head = c.d_model * self.wte.weight.shape[0]
        exact = 6 * (n_nonemb + head) + 12 * c.n_layer * c.d_model * seq_len
        return float(exact), float(6 * self.num_params())

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, T, V)``; with ``labels`` the mean cross-entropy over labels != -100."""
        logits, _ = self._forward(input_ids)
        if labels is None:
            return logits
        return self.loss_fn(logits, labels)

    def _forward(self, input_ids: torch.Tensor, kv_caches=None, start_pos: int = 0):
        t = input_ids.shape[1]
        if start_pos + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        pos = torch.arange(start_pos, start_pos + t, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        new_caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, None if kv_caches is None else kv_caches[i])
            new_caches.append(cache)
        return self.lm_head(self.ln_f(x)), new_caches

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample with a KV cache; ``temperature=0`` is greedy. Returns prompt + new tokens."""
        out = input_ids
        room = self.cfg.max_seq_len - input_ids.shape[1]
        logits, caches = self._forward(input_ids)
        for _ in range(min(max_new_tokens, room)):
            next_logits = logits[:, -1, :].float()
            nxt = sample_next(next_logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt], dim=1)
            if stop_tokens and all(int(t) in stop_tokens for t in nxt[:, 0]):
                break
            logits, caches = self._forward(nxt, caches, start_pos=out.shape[1] - 1)
        return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from ``(B, V)`` logits: greedy, temperature, top-k and nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already exceeds top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(-1)) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
