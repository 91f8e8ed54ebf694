"""GPT: a decoder-only Transformer (pre-norm, causal SDPA), in two shapes from one set of options.

- GPT-2 (the defaults): learned positions, LayerNorm with biases, GELU MLP, one key/value head
  per query head, tied embeddings. With ``bias=True`` and ``norm_eps=1e-5`` it computes exactly
  what ``GPT2LMHeadModel`` computes.
- Llama (``position: rope``, ``norm: rmsnorm``, ``activation: swiglu``, ``n_kv_head`` < ``n_head``,
  ``bias: false``, tied or not): rotary positions (Llama-3's frequency scaling as an option),
  RMSNorm, a SwiGLU MLP, grouped-query attention. It computes what ``LlamaForCausalLM`` computes.
  ``qk_norm`` adds RMSNorm on each head's queries and keys (as OLMo-2 and Qwen3 do).

Either shape may take μP (``mup``, the maximal-update parametrisation of Yang et al. 2022):
hyperparameters tuned on a base width then hold at any width (``MuP`` says what changes).

Single-device code, readable top to bottom. Parameter names follow Hugging Face GPT-2 (``wte``,
``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn`` ...) in both shapes, so tensor and pipeline
parallelism, checkpoints and the planner treat them alike. The fused q/k/v projection ``c_attn``
orders its rows by key/value group (``models/fused_qkv.py``): a group's query heads, its key
head, its value head; so tensor parallelism cuts it into whole groups.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.fused_qkv import split_groups
from models.init import seeded_normal_
from models.loss import TokenCrossEntropy
from models.mup import MuP, MuPWidths, readout


class RopeScaling(BaseModel):
    """Llama-3's RoPE frequency scaling: wavelengths longer than the original context divided by
    ``factor``, shorter than ``original_max_seq_len / high_freq_factor`` kept, a smooth blend
    between (Meta's Llama 3.1 release; ``rope_type: llama3`` in transformers)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    factor: float = Field(8.0, gt=0)
    """How much longer the context becomes: low frequencies are divided by it."""
    low_freq_factor: float = Field(1.0, gt=0)
    """Wavelengths above ``original_max_seq_len / low_freq_factor`` are scaled fully."""
    high_freq_factor: float = Field(4.0, gt=0)
    """Wavelengths below ``original_max_seq_len / high_freq_factor`` are kept."""
    original_max_seq_len: int = Field(8192, ge=1)
    """The context the frequencies were trained for."""


class GPTConfig(MuPWidths, BaseModel):
    """Shape of a GPT model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    # Rank-2 parameters that are not μP's hidden matrices (a vocabulary or position dimension).
    mup_fixed: ClassVar[tuple[str, ...]] = ("wte.weight", "wpe.weight", "lm_head.weight")

    family: Literal["gpt"] = "gpt"
    """Model family; selects the class in ``models.build``."""
    n_layer: int = Field(4, ge=1)
    """Number of Transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; must divide ``d_model``."""
    d_model: int = Field(128, ge=1)
    """Hidden size."""
    d_ff: int | None = Field(None, ge=1)
    """MLP inner size; ``null``: ``4 * d_model`` for GELU, ``8/3 * d_model`` (to a multiple of 16)
    for SwiGLU."""
    max_seq_len: int = Field(256, ge=1)
    """The longest context the model accepts (the rows of the learned position table)."""
    vocab_size: int | None = Field(None, ge=2)
    """Embedding rows; ``null`` takes the tokenizer's vocabulary size."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention probabilities and residual branches."""
    bias: bool = True
    """Biases in linear layers and LayerNorms (GPT-2 has them)."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    norm_eps: float = Field(1e-5, gt=0)
    """Norm epsilon (LayerNorm or RMSNorm)."""
    activation: Literal["gelu_tanh", "gelu", "swiglu"] = "gelu_tanh"
    """MLP: ``gelu_tanh``, GPT-2's tanh approximation (``gelu_new`` in transformers), ``gelu``, the
    exact erf form (nanoGPT's; cheaper than the tanh form on a CPU), or ``swiglu``, the gated
    SiLU MLP of Llama (Shazeer 2020: ``c_proj(silu(gate(x)) * up(x))``, three matrices; gate and
    up fused in ``c_fc``, their units alternating)."""
    init_std: float = Field(0.02, gt=0)
    """Std of the normal init; residual output projections use ``init_std / sqrt(2 * n_layer)``."""
    n_kv_head: int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention: each serves ``n_head / n_kv_head`` query heads;
    1 is multi-query attention); ``null`` means ``n_head`` (multi-head attention, GPT-2's)."""
    position: Literal["learned", "rope"] = "learned"
    """Positions: a learned table added to the embeddings (``wpe``, GPT-2's), or rotary position
    embeddings applied to queries and keys (RoPE, Su et al. 2021; no position table)."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base: frequencies ``rope_theta ** (-2i / head_dim)`` (Llama-3 uses 500000)."""
    rope_scaling: RopeScaling | None = None
    """Llama-3's frequency scaling for long contexts (``LlamaForCausalLM``'s ``rope_type: llama3``);
    ``null``: plain RoPE."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Block and final norms: LayerNorm (GPT-2; with a bias when ``bias``) or RMSNorm (Llama)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE and attention (OLMo-2, Qwen3): keeps
    attention logits bounded at high learning rates."""
    mup: MuP | None = None
    """The maximal-update parametrisation (``MuP``); ``null``: the standard one."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}; "
                f"use a divisor of {self.n_head} (1 for multi-query attention, null for {self.n_head})"
            )
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.position=rope needs an even head size; d_model/n_head = "
                f"{self.d_model}/{self.n_head} = {self.d_model // self.n_head}"
            )
        self.check_mup()
        return self

    @property
    def ff_size(self) -> int:
        """MLP inner size: ``d_ff``, else 4·d for GELU, and for SwiGLU 8d/3 rounded up to a
        multiple of 16 (about the weights of a 4·d GELU MLP in three matrices, as Llama sizes it)."""
        if self.d_ff:
            return self.d_ff
        if self.activation == "swiglu":
            return -(-8 * self.d_model // 48) * 16
        return 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def rope_frequencies(cfg: GPTConfig, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``(head_dim / 2,)`` in fp32, with Llama-3's scaling if set."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low, high = s.original_max_seq_len / s.low_freq_factor, s.original_max_seq_len / s.high_freq_factor
    scaled = torch.where(wavelen > low, inv_freq / s.factor, inv_freq)
    # Between the two wavelengths, a linear blend of the scaled and the original frequency.
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high) & (wavelen <= low)
    return torch.where(medium, blended, scaled)


def rope_angles(cfg: GPTConfig, start: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``(T, head_dim)`` of positions ``start .. start+T-1``, computed in fp32 and
    cast to ``like``'s dtype (as transformers does)."""
    return rope_angles_at(cfg, torch.arange(start, start + length, device=like.device), like)


def rope_angles_at(cfg: GPTConfig, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``(*positions.shape, head_dim)`` of the given positions (fp32, then ``like``'s dtype)."""
    angles = positions.float()[..., None] * rope_frequencies(cfg, like.device)
    angles = torch.cat((angles, angles), dim=-1)  # both halves of a head rotate by the same angles
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


class Documents(NamedTuple):
    """Documents packed into the windows of a batch (``data.document_mask``): attention stays
    inside each one and positions restart at each one, so a window computes what its
    documents would one by one."""

    mask: torch.Tensor
    """``(B, 1, T, T)`` bool: key j is visible to query i when j ≤ i in the same document."""
    positions: torch.Tensor
    """``(B, T)``: each token's position within its document."""

    @classmethod
    def of(cls, document_ids: torch.Tensor) -> Documents:
        """From ``(B, T)`` document numbers, non-decreasing along each row."""
        t = document_ids.shape[1]
        idx = torch.arange(t, device=document_ids.device)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first = torch.where(starts, idx, 0).cummax(dim=1).values  # where each token's document began
        same = document_ids[:, :, None] == document_ids[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
        return cls((same & causal)[:, None], idx - first)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, H, T, head_dim)``: the two halves of each head are the pairs rotated together
    (Llama's ``rotate_half`` layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_norm(cfg: GPTConfig, size: int | None = None) -> nn.Module:
    size = size or cfg.d_model
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=cfg.norm_eps)
    return nn.LayerNorm(size, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg, self.head_dim = cfg, hd
        self.group = cfg.n_head // cfg.kv_heads  # query heads per key/value head
        self.dropout = cfg.dropout
        # One matmul for q, k and v: under tensor parallelism one column-parallel input (one
        # all-reduce of its gradient) instead of three.
        self.c_attn = nn.Linear(d, (cfg.n_head + 2 * cfg.kv_heads) * hd, bias=cfg.bias)
        self.c_proj = nn.Linear(d, d, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        docs: Documents | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # Heads and length from the projection, not the config or ``x``: under tensor
        # parallelism each rank holds n_head / tp heads, and under sequence parallelism ``x`` is
        # 1/tp of the sequence the projection gathers; the same code runs unchanged.
        q, k, v = split_groups(self.c_attn(x), self.head_dim, self.group)
        t = q.shape[2]
        past = 0 if kv_cache is None else kv_cache[0].shape[2]
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.position == "rope":
            if docs is not None:  # (B, 1, T, head_dim): every row its own positions
                cos, sin = (a[:, None] for a in rope_angles_at(self.cfg, docs.positions, q))
            else:
                cos, sin = rope_angles(self.cfg, past, t, q)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        # A cached prefix makes the query block shorter than the keys: causal masking then needs
        # an explicit offset mask (is_causal aligns to the top-left corner).
        if docs is not None:
            mask, causal = docs.mask, False
        elif kv_cache is None or t == 1:
            mask, causal = None, kv_cache is None
        else:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.cfg.attn_scale,
            enable_gqa=self.group > 1,
        )
        y = y.transpose(1, 2).flatten(2)
        return self.resid_drop(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        # SwiGLU's gate and up projections are one matmul whose output units alternate (gate
        # unit i, up unit i, ...): any contiguous cut of its rows holds matching pairs, so tensor
        # parallelism cuts it like any column-parallel linear (one input, one all-reduce).
        self.c_fc = nn.Linear(cfg.d_model, cfg.ff_size * (2 if self.gated else 1), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ff_size, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
            return self.drop(self.c_proj(F.silu(gate) * up))
        return self.drop(self.c_proj(F.gelu(h, approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache=None, docs: Documents | None = None):
        a, new_cache = self.attn(self.ln_1(x), kv_cache, docs)
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
    elif ".ln_" in name or name.startswith("ln_") or "_norm." in name:
        p.fill_(1.0)
    else:
        std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith(RESIDUAL_PROJ_SUFFIXES) else cfg.init_std
        seeded_normal_(p, seed, name, cfg.hidden_std(name, std))
        if cfg.mup and cfg.mup.query_zero_init and name.endswith("attn.c_attn.weight"):
            group = cfg.n_head // cfg.kv_heads  # rows per key/value group: its queries, key, value
            p.view(cfg.kv_heads, group + 2, cfg.head_dim, -1)[:, :group].zero_()


class GPT(nn.Module):
    """Decoder-only language model. ``forward(input_ids, labels)`` returns the mean token loss."""

    def __init__(self, cfg: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
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
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per token: (exact-ish, 6N approximation).

        Matmul FLOPs only (forward 2 per multiply-add, backward twice forward): 6 * non-embedding
        params + 6 * lm_head (the output projection is a matmul even when tied) + attention
        scores and weighted sum, 12 * n_layer * d_model * seq_len (nanoGPT / PaLM appendix B).
        The parameters carry SwiGLU's third matrix and GQA's smaller key/value projections; the
        scores still run over every query head (n_head · head_dim = d_model). RoPE, norms and
        the gate's product are elementwise, not counted (as GPT-2's GELU is not).
        """
        c = self.cfg
        n_nonemb = self.num_params(non_embedding=True)  # an untied head is among them already
        head = c.d_model * self.wte.weight.shape[0] if c.tie_embeddings else 0
        exact = 6 * (n_nonemb + head) + 12 * c.n_layer * c.d_model * seq_len
        return float(exact), float(6 * self.num_params())

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, V)``; with ``labels`` the mean cross-entropy over labels != -100.
        ``document_ids`` ``(B, T)``: the document each token belongs to, for packed documents
        that must not see each other (``Documents``)."""
        docs = Documents.of(document_ids) if document_ids is not None else None
        h, _ = self._hidden(input_ids, docs=docs)
        if labels is None:
            return self.lm_head(h)
        if getattr(self.loss_fn, "chunk_tokens", 0):  # the head inside the loss, in chunks
            return self.loss_fn.head_forward(h, self.lm_head.weight, labels)
        return self.loss_fn(self.lm_head(h), labels)

    def _forward(self, input_ids: torch.Tensor, kv_caches=None, start_pos: int = 0):
        h, caches = self._hidden(input_ids, kv_caches, start_pos)
        return self.lm_head(h), caches

    def _hidden(self, input_ids: torch.Tensor, kv_caches=None, start_pos: int = 0, docs: Documents | None = None):
        """The final norm's output (the head's input) and the new KV caches."""
        t = input_ids.shape[1]
        if start_pos + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        x = self.wte(input_ids)
        if self.cfg.position == "learned":
            pos = docs.positions if docs is not None else torch.arange(start_pos, start_pos + t, device=input_ids.device)
            x = x + self.wpe(pos)
        x = self.drop(x)
        new_caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, None if kv_caches is None else kv_caches[i], docs)
            new_caches.append(cache)
        return readout(self.cfg, self.ln_f(x)), new_caches

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
        """Sample with a KV cache; ``temperature=0`` is greedy. Returns prompt + new tokens.

        The model reads at most ``max_seq_len`` tokens, as nanoGPT crops to its block size: a
        longer prompt is read from its last ``max_seq_len`` tokens, and once the context is full
        the cache restarts from the last half of it (positions counted from the window's start).
        """
        limit = self.cfg.max_seq_len
        out = input_ids
        logits, caches = self._forward(input_ids[:, -limit:])
        cached = min(input_ids.shape[1], limit)
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1, :].float()
            nxt = sample_next(next_logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt], dim=1)
            if stop_tokens and all(int(t) in stop_tokens for t in nxt[:, 0]):
                break
            if cached == limit:  # full: recompute the last half as a new window
                cached = max(1, limit // 2)
                logits, caches = self._forward(out[:, -cached:])
            else:
                logits, caches = self._forward(nxt, caches, start_pos=cached)
                cached += 1
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
