"""RNN baselines on ``nn.RNN`` (tanh) / ``nn.LSTM`` / ``nn.GRU``: never hand-written cells.

- ``RNNLM``: embedding, stacked recurrent layers, dropout, projection, optional weight tying.
  ``forward(input_ids, labels, state)`` returns ``(loss, new_state)``: truncated BPTT carries the
  state into the next window; the caller detaches it at the window edge.
- ``Seq2SeqRNN``: bidirectional encoder, decoder with additive (Bahdanau) attention
  ``e_ij = vᵀ tanh(W s_{i-1} + U h_j)`` over encoder states (padding masked), and teacher forcing
  with scheduled sampling: with probability ``sampling_prob`` (set by the trainer from a
  schedule) the decoder is fed its own previous prediction instead of the gold token.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.decoding import decode
from models.gpt import sample_next
from models.init import count_params, fan_in_std, seeded_normal_
from models.sources import SourceConfig, keep_mask, source_cost, source_encoder

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def detach_state(state: State | None) -> State | None:
    """Cut the graph at a window edge (truncated BPTT) but keep the values."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class _RNNBase(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    n_layers: int = Field(2, ge=1)
    """Stacked recurrent layers."""
    d_embed: int = Field(128, ge=1)
    """Embedding size."""
    d_hidden: int = Field(256, ge=1)
    """Hidden size of each recurrent layer (per direction in the encoder)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on embeddings, between layers and before the output projection."""
    init_std: float = Field(0.1, gt=0)
    """Std of the normal init of weights (recurrent weights included)."""


class RNNLMConfig(_RNNBase):
    """A recurrent language model."""

    family: Literal["rnn_lm"] = "rnn_lm"
    """Model family."""
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    """Recurrent cell: ``rnn`` (Elman, tanh), ``lstm`` or ``gru``."""
    vocab_size: int | None = Field(None, ge=2)
    """Vocabulary; ``null`` takes the tokenizer's size."""
    tie_weights: bool = False
    """Share the embedding with the output projection (needs ``d_embed == d_hidden``)."""

    @model_validator(mode="after")
    def _tie(self) -> RNNLMConfig:
        if self.tie_weights and self.d_embed != self.d_hidden:
            raise ValueError(
                f"model.tie_weights needs model.d_embed ({self.d_embed}) == model.d_hidden ({self.d_hidden})"
            )
        return self


class Seq2SeqRNNConfig(_RNNBase):
    """Bidirectional RNN encoder, attention RNN decoder."""

    family: Literal["rnn_seq2seq"] = "rnn_seq2seq"
    """Model family."""
    cell: Literal["gru", "lstm"] = "gru"
    """Recurrent cell of encoder and decoder."""
    d_attn: int = Field(128, ge=1)
    """Size of the additive attention's hidden layer (v, W and U)."""
    source: SourceConfig | None = None
    """What the encoder reads: ``null``: token ids; else its encoder (``models/sources.py``),
    whose features of width ``d_embed`` the bidirectional RNN reads in their place."""
    src_vocab_size: int | None = Field(None, ge=2)
    """Source vocabulary; ``null`` takes the source tokenizer's size (unused with ``source``)."""
    tgt_vocab_size: int | None = Field(None, ge=2)
    """Target vocabulary; ``null`` takes the target tokenizer's size."""
    share_embeddings: bool = False
    """One embedding table for source and target (needs one shared vocabulary)."""
    pad_id: int = Field(1, ge=0)
    """Padding token id."""
    max_seq_len: int = Field(256, ge=1)
    """Longest target generated."""

    @model_validator(mode="after")
    def _shared(self) -> Seq2SeqRNNConfig:
        if self.share_embeddings and self.source is not None:
            raise ValueError(f"model.share_embeddings needs a token source, not model.source.kind={self.source.kind}")
        return self


class RNNLM(nn.Module):
    def __init__(self, cfg: RNNLMConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("RNNLMConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.rnn = CELLS[cfg.cell](cfg.d_embed, cfg.d_hidden, cfg.n_layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.d_hidden, cfg.vocab_size)
        if cfg.tie_weights:
            self.out.weight = self.embed.weight
        _init(self, seed, cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Matmul FLOPs: 6 × (recurrent + output weights); no attention term."""
        n = self.num_params(non_embedding=True) + (self.out.weight.numel() if self.cfg.tie_weights else 0)
        return float(6 * n), float(6 * self.num_params())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: State | None = None):
        """Logits and the final state; with ``labels``, ``(mean loss, final state)``."""
        h, new_state = self.rnn(self.drop(self.embed(input_ids)), state)
        logits = self.out(self.drop(h))
        if labels is None:
            return logits, new_state
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, new_state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 stop_tokens: tuple[int, ...] = (), generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuing from the prompt's final state (one step per token)."""
        logits, state = self(input_ids)
        out = input_ids
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt], dim=1)
            if stop_tokens and all(int(t) in stop_tokens for t in nxt[:, 0]):
                break
            logits, state = self(nxt, state=state)
        return out


class AdditiveAttention(nn.Module):
    """Bahdanau attention: e_ij = vᵀ tanh(W s_{i-1} + U h_j), softmax over real source positions."""

    def __init__(self, d_query: int, d_key: int, d_attn: int) -> None:
        super().__init__()
        self.W = nn.Linear(d_query, d_attn, bias=False)
        self.U = nn.Linear(d_key, d_attn)
        self.v = nn.Linear(d_attn, 1, bias=False)

    def forward(self, query: torch.Tensor, keys_proj: torch.Tensor, keys: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Dq); keys_proj = U(keys) (B, S, A), precomputed once per source; mask (B, S)."""
        e = self.v(torch.tanh(self.W(query)[:, None, :] + keys_proj)).squeeze(-1)
        weights = e.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.bmm(weights[:, None, :], keys).squeeze(1), weights


class Seq2SeqRNN(nn.Module):
    def __init__(self, cfg: Seq2SeqRNNConfig, seed: int = 0) -> None:
        super().__init__()
        if (cfg.source is None and cfg.src_vocab_size is None) or cfg.tgt_vocab_size is None:
            raise ValueError("Seq2SeqRNNConfig vocab sizes must be resolved before building the model")
        self.cfg = cfg
        cell = CELLS[cfg.cell]
        inter = cfg.dropout if cfg.n_layers > 1 else 0.0
        if cfg.source is None:
            self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_embed)
        else:
            self.source = source_encoder(cfg.source, cfg.d_embed)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, cfg.d_embed)
        self.encoder = cell(cfg.d_embed, cfg.d_hidden, cfg.n_layers, batch_first=True,
                            bidirectional=True, dropout=inter)
        d_enc = 2 * cfg.d_hidden
        self.bridge = nn.Linear(cfg.d_hidden, cfg.d_hidden)  # s_0 = tanh(W_s ←h_1), as Bahdanau
        self.attention = AdditiveAttention(cfg.d_hidden, d_enc, cfg.d_attn)
        self.decoder = cell(cfg.d_embed + d_enc, cfg.d_hidden, cfg.n_layers, batch_first=True, dropout=inter)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_out = nn.Linear(cfg.d_hidden + d_enc + cfg.d_embed, cfg.d_hidden)
        self.out = nn.Linear(cfg.d_hidden, cfg.tgt_vocab_size)
        self.sampling_prob = 0.0
        """Scheduled sampling ε: probability of feeding the model's own previous prediction."""
        _init(self, seed, cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        # A set: shared source/target embeddings are subtracted once.
        embeddings = {self.tgt_embed.weight, *([] if self.cfg.source else [self.src_embed.weight])}
        return count_params(self, embeddings if non_embedding else None)

    def flops_per_sample(self, tgt_len: int, src_len: int | None = None) -> float:
        """Training FLOPs of one pair: 6 × the encoder's weights per source position (an image
        source: its grid after the convolutions; a sound of ``src_len`` samples, by default
        ``model.source.max_seconds``: its frames after them), 6 × the rest per target token, plus the
        attention of each target token over the source states."""
        c = self.cfg
        convs, src_len, source = source_cost(getattr(self, "source", None), src_len, tgt_len)
        enc = count_params(self.encoder) + count_params(self.bridge) + count_params(self.attention.U)
        dec = self.num_params(non_embedding=True) - enc - source
        attn = 6 * src_len * (c.d_attn + 2 * c.d_hidden)  # tanh(W s + U h) · v and the weighted sum
        return float(6 * (enc * src_len + dec * tgt_len) + attn * tgt_len + convs)

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per target token of a pair with ``seq_len`` target tokens (and as
        many source tokens)."""
        return self.flops_per_sample(seq_len) / seq_len, float(6 * self.num_params())

    def encode(self, src: torch.Tensor, src_lengths: list[int] | None = None):
        if self.cfg.source is not None:
            x, lengths = self.source(src, src_lengths)
            lengths = lengths or [x.shape[1]] * x.shape[0]  # images: one size, nothing padded
            mask = keep_mask(lengths, x.shape[1], x.device)
            lengths = torch.tensor(lengths)
        else:
            x, mask = self.src_embed(src), src != self.cfg.pad_id
            # Packing wants the lengths on the host: the batch's own (no device read), else counted.
            lengths = torch.tensor(src_lengths) if src_lengths is not None else mask.sum(1).clamp(min=1).cpu()
        # Packing runs the recurrence over real positions only: padding cannot leak into any state.
        packed = pack_padded_sequence(self.drop(x), lengths, batch_first=True, enforce_sorted=False)
        out, final = self.encoder(packed)
        keys, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        h_n = final[0] if isinstance(final, tuple) else final  # (layers*2, B, H)
        backward_first = h_n.view(self.cfg.n_layers, 2, *h_n.shape[1:])[:, 1]  # (layers, B, H)
        s0 = torch.tanh(self.bridge(backward_first)).contiguous()
        state = (s0, torch.zeros_like(s0)) if self.cfg.cell == "lstm" else s0
        return keys, self.attention.U(keys), mask, state

    def _step(self, prev_tok, state, keys, keys_proj, mask):
        """One decoder step: attend with s_{i-1}, then update the state; returns logits."""
        top = (state[0] if isinstance(state, tuple) else state)[-1]
        context, weights = self.attention(top, keys_proj, keys, mask)
        emb = self.drop(self.tgt_embed(prev_tok))
        out, state = self.decoder(torch.cat([emb, context], -1)[:, None, :], state)
        h = torch.tanh(self.pre_out(torch.cat([out[:, 0], context, emb], -1)))
        return self.out(self.drop(h)), state, weights

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, labels: torch.Tensor | None = None,
                src_lengths: list[int] | None = None):
        keys, keys_proj, mask, state = self.encode(src, src_lengths)
        logits, prev = [], tgt_in[:, 0]
        for i in range(tgt_in.shape[1]):
            if i > 0:
                prev = tgt_in[:, i]
                if self.training and self.sampling_prob > 0:
                    # Scheduled sampling (Bengio et al. 2015): per token, feed the model's own
                    # previous prediction with probability ε.
                    own = logits[-1].argmax(-1).detach()
                    coin = torch.rand(prev.shape, device=prev.device) < self.sampling_prob
                    prev = torch.where(coin, own, prev)
            step_logits, state, _ = self._step(prev, state, keys, keys_proj, mask)
            logits.append(step_logits)
        logits = torch.stack(logits, 1)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def attention_weights(self, src: torch.Tensor, tgt_in: torch.Tensor,
                          src_lengths: list[int] | None = None) -> torch.Tensor:
        """(B, T, S) attention weights under teacher forcing (for inspection and tests)."""
        keys, keys_proj, mask, state = self.encode(src, src_lengths)
        out = []
        for i in range(tgt_in.shape[1]):
            _, state, w = self._step(tgt_in[:, i], state, keys, keys_proj, mask)
            out.append(w)
        return torch.stack(out, 1)

    def decoder_step_fn(self, src: torch.Tensor, src_lengths: list[int] | None = None):
        """``step(rows, prefix) -> next-token log-probs`` over this source batch (for decoding)."""
        keys, keys_proj, mask, s0 = self.encode(src, src_lengths)

        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            # Re-run the decoder over the prefix: simple, and decoding is not the hot path.
            state = tuple(x[:, rows] for x in s0) if isinstance(s0, tuple) else s0[:, rows]
            for i in range(prefix.shape[1]):
                logits, state, _ = self._step(prefix[:, i], state, keys[rows], keys_proj[rows], mask[rows])
            return logits.float().log_softmax(-1)

        return step

    @torch.no_grad()
    def translate(self, src: torch.Tensor, bos: int, eos: int, max_len: int = 64,
                  beam: int = 1, length_penalty: float = 1.0, src_lengths: list[int] | None = None) -> list[list[int]]:
        max_len = min(max_len, self.cfg.max_seq_len)
        return decode(self.decoder_step_fn(src, src_lengths), src.shape[0], bos, eos, max_len, beam,
                      length_penalty, src.device)


@torch.no_grad()
def _init(module: nn.Module, seed: int, std: float) -> None:
    for name, p in module.named_parameters():
        if "bias" in name:
            p.zero_()
        elif name.startswith("source.") and "norm" in name:
            p.fill_(1.0)
        elif name.startswith("source."):  # convolutions followed by ReLU or GELU
            seeded_normal_(p, seed, name, fan_in_std(p))
        else:
            seeded_normal_(p, seed, name, std)
