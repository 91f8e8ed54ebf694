"""Speech synthesis (Char2Wav and Tacotron, in small): characters ► log-mel frames ► waveform.

- **Encoder**: character embeddings read by a bidirectional GRU over the real positions only
  (packed), as Char2Wav's reader.
- **Decoder**, one step per ``reduction`` frames (Tacotron's r): the last frame fed back goes
  through a *prenet* (two ReLU layers with dropout that stays on when synthesising too, as in
  Tacotron 2: the bottleneck that makes the decoder listen to the text, not only to its own
  previous frame); an attention GRU reads it with the previous context; Graves' Gaussian
  mixture attention, whose means only move forward (``μ_t = μ_{t-1} + softplus(Δ)``), places the
  context on the characters, so the alignment is monotonic by construction and learns in
  minutes (content-based attention has to discover it); a decoder GRU reads the attention state
  and the context; two linear heads give the next ``reduction`` frames and a stop logit.
- **Targets** are computed in the model from the waveforms of the batch (``power_mel``, the
  filter bank of ``models/sources.py``), on whatever device the model is on. A frame is
  ``log(max(mel power, 1e-4)) / 4``: silence floors at -2.3, loud speech reaches about +2.
- **Loss**: L1 on the real frames (teacher forcing) plus the stop token's binary cross-entropy
  on the real decoder steps (1 on the last).
- **Waveform**: ``synthesize`` runs the decoder on its own frames until the stop probability
  passes 1/2; ``mel_to_wave`` (Griffin-Lim) turns the frames into samples.

Batch contract: ``src`` (B, S) character ids padded with ``pad_id``, ``src_lengths`` their real
lengths (host ints); ``wave`` (B, samples) in [-1, 1] at ``audio.sample_rate``, padded with zeros,
and ``wave_lengths`` (host ints).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.init import count_params, seeded_normal_
from models.sources import MelFrames, keep_mask, mel_filterbank, mel_to_wave, power_mel

FLOOR = 1e-4
"""Mel power of silence: frames are clamped to it before the log."""
SCALE = 4.0
"""Log-mel values are divided by it, to sit near [-2, 2]."""


class TTSConfig(BaseModel):
    """Characters to log-mel frames with a Gaussian-mixture attention decoder."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    family: Literal["tts"] = "tts"
    """Model family."""
    audio: MelFrames = Field(default_factory=MelFrames)
    """The sound written: sample rate and the mel frames the decoder predicts."""
    vocab_size: int | None = Field(None, ge=2)
    """Characters; ``null`` takes the tokenizer's size."""
    pad_id: int = Field(1, ge=0)
    """Padding id of the character sequences."""
    max_seq_len: int = Field(128, ge=1)
    """Longest text read, in tokens."""
    d_embed: int = Field(128, ge=1)
    """Character embedding size."""
    d_encoder: int = Field(128, ge=1)
    """Hidden size of the encoder GRU, per direction."""
    d_prenet: int = Field(128, ge=1)
    """Width of the prenet's two layers."""
    d_decoder: int = Field(256, ge=1)
    """Hidden size of the attention GRU and of the decoder GRU."""
    d_attn: int = Field(64, ge=1)
    """Hidden layer of the MLP that gives the attention's mixture parameters."""
    mixtures: int = Field(5, ge=1)
    """Gaussians of the attention."""
    reduction: int = Field(4, ge=1)
    """Frames per decoder step (Tacotron's r)."""
    prenet_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    """Dropout of the prenet, in training and synthesis alike."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the character embeddings and before the output heads (training only)."""
    stop_weight: float = Field(1.0, ge=0.0)
    """Weight of the stop token's loss beside the frames' L1."""
    init_std: float = Field(0.1, gt=0)
    """Std of the normal init of weights (recurrent weights included)."""

    @property
    def max_decoder_steps(self) -> int:
        """Steps that ``audio.max_seconds`` of frames take (synthesis stops there at the latest)."""
        return math.ceil(self.audio.frames(round(self.audio.max_seconds * self.audio.sample_rate)) / self.reduction)


class GMMAttention(nn.Module):
    """Graves (2013) location attention: a mixture of Gaussians over character positions whose
    weights, widths and forward steps come from the query (softmax, softplus, softplus: the
    GMMv2 of Battenberg et al. 2020); weights on padding are zero."""

    def __init__(self, d_query: int, d_attn: int, mixtures: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_query, d_attn), nn.Tanh(), nn.Linear(d_attn, 3 * mixtures))

    def forward(self, query: torch.Tensor, mu: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query (B, Dq), previous means (B, K), keys (B, S, Dk), mask (B, S) ► context (B, Dk),
        weights (B, S), means (B, K)."""
        w_hat, delta, sigma = self.mlp(query).float().chunk(3, -1)
        mu = mu + F.softplus(delta)
        sigma = F.softplus(sigma) + 0.1  # at least a tenth of a character wide
        pos = torch.arange(keys.shape[1], device=keys.device, dtype=torch.float32)
        z = (pos[None, None, :] - mu[:, :, None]) / sigma[:, :, None]  # (B, K, S)
        weights = (w_hat.softmax(-1)[:, :, None] * torch.exp(-0.5 * z * z)).sum(1) * mask
        return torch.bmm(weights.to(keys.dtype)[:, None, :], keys).squeeze(1), weights, mu


class TTS(nn.Module):
    def __init__(self, cfg: TTSConfig, seed: int = 0) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("TTSConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        a, d_enc = cfg.audio, 2 * cfg.d_encoder
        self.register_buffer("fbank", mel_filterbank(a.n_fft // 2 + 1, a.n_mels, a.sample_rate), persistent=False)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.encoder = nn.GRU(cfg.d_embed, cfg.d_encoder, batch_first=True, bidirectional=True)
        self.prenet = nn.ModuleList([nn.Linear(a.n_mels, cfg.d_prenet), nn.Linear(cfg.d_prenet, cfg.d_prenet)])
        self.attention_rnn = nn.GRUCell(cfg.d_prenet + d_enc, cfg.d_decoder)
        self.attention = GMMAttention(cfg.d_decoder, cfg.d_attn, cfg.mixtures)
        self.decoder_rnn = nn.GRUCell(cfg.d_decoder + d_enc, cfg.d_decoder)
        self.drop = nn.Dropout(cfg.dropout)
        self.frames_out = nn.Linear(cfg.d_decoder + d_enc, cfg.reduction * a.n_mels)
        self.stop_out = nn.Linear(cfg.d_decoder + d_enc, 1)
        _init(self, seed, cfg.init_std)

    # ------------------------------------------------------------------ frames and their cost

    def log_mel(self, wave: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """(B, frames, n_mels) target frames of the waveforms and each row's real frames."""
        a = self.cfg.audio
        if wave.shape[1] < a.n_fft:
            wave = F.pad(wave, (0, a.n_fft - wave.shape[1]))
        mel = power_mel(wave, self.fbank, a.n_fft, a.hop)
        return torch.log(mel.clamp(min=FLOOR)) / SCALE, [a.frames(n) for n in lengths]

    def to_wave(self, frames: torch.Tensor, n_iter: int = 32) -> torch.Tensor:
        """Samples of one row's (frames, n_mels) by Griffin-Lim."""
        a = self.cfg.audio
        return mel_to_wave(torch.exp(frames.float() * SCALE), self.fbank, a.n_fft, a.hop, n_iter)

    def num_params(self, non_embedding: bool = False) -> int:
        return count_params(self, {self.embed.weight} if non_embedding else None)

    def flops_per_sample(self, frames: int, chars: int) -> float:
        """Training FLOPs of one sentence: 6 per encoder weight per character, 6 per decoder
        weight per decoder step (``frames / reduction``), and the attention's mixture over
        every character and weighted sum of its states at each step. The STFT is no matmul;
        the filter bank's projection is forward only."""
        c, d_enc = self.cfg, 2 * self.cfg.d_encoder
        steps = math.ceil(frames / c.reduction)
        enc = count_params(self.encoder)
        dec = self.num_params(non_embedding=True) - enc
        attn = 6 * chars * (3 * c.mixtures + d_enc)
        return float(6 * enc * chars + (6 * dec + attn) * steps + 2 * frames * self.fbank.numel())

    def flops_per_token(self, seq_len: int) -> tuple[float, float]:
        """Training FLOPs per frame (the unit of throughput) of a sentence of ``seq_len``
        characters spoken in ``audio.max_seconds``."""
        a = self.cfg.audio
        frames = a.frames(round(a.max_seconds * a.sample_rate))
        return self.flops_per_sample(frames, seq_len) / frames, float(6 * self.num_params())

    # ------------------------------------------------------------------ encoder and decoder

    def encode(self, src: torch.Tensor, src_lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Character states (B, S, 2·d_encoder) and the mask of real positions."""
        lengths = src_lengths or (src != self.cfg.pad_id).sum(1).clamp(min=1).tolist()
        packed = pack_padded_sequence(self.drop(self.embed(src)), torch.tensor(lengths), batch_first=True,
                                      enforce_sorted=False)
        keys, _ = pad_packed_sequence(self.encoder(packed)[0], batch_first=True, total_length=src.shape[1])
        return keys, keep_mask(lengths, src.shape[1], src.device)

    def _start(self, keys: torch.Tensor) -> tuple:
        b = keys.shape[0]
        h = keys.new_zeros(b, self.cfg.d_decoder)
        mu = torch.zeros(b, self.cfg.mixtures, device=keys.device)
        return h, h, keys.new_zeros(b, keys.shape[2]), mu

    def _step(self, prev: torch.Tensor, state: tuple, keys: torch.Tensor, mask: torch.Tensor):
        """One decoder step from the last frame fed (B, n_mels) ► frames (B, r·n_mels), stop
        logit (B,), new state, attention weights (B, S)."""
        h_att, h_dec, context, mu = state
        x = prev
        for layer in self.prenet:
            x = F.dropout(F.relu(layer(x)), self.cfg.prenet_dropout, training=True)
        h_att = self.attention_rnn(torch.cat([x, context], -1), h_att)
        context, weights, mu = self.attention(h_att, mu, keys, mask)
        h_dec = self.decoder_rnn(torch.cat([h_att, context], -1), h_dec)
        out = self.drop(torch.cat([h_dec, context], -1))
        return self.frames_out(out), self.stop_out(out).squeeze(-1), (h_att, h_dec, context, mu), weights

    def forward(self, src: torch.Tensor, wave: torch.Tensor, src_lengths: list[int] | None = None,
                wave_lengths: list[int] | None = None) -> torch.Tensor:
        """Teacher-forced loss: L1 of the real frames plus the stop token's cross-entropy."""
        r, n_mels = self.cfg.reduction, self.cfg.audio.n_mels
        target, n_frames = self.log_mel(wave, wave_lengths or [wave.shape[1]] * wave.shape[0])
        steps = [math.ceil(n / r) for n in n_frames]
        t = max(steps)
        target = F.pad(target, (0, 0, 0, t * r - target.shape[1]), value=math.log(FLOOR) / SCALE)[:, : t * r]
        groups = target.reshape(target.shape[0], t, r * n_mels)
        keys, mask = self.encode(src, src_lengths)
        state, prev, frames, stops = self._start(keys), groups.new_zeros(groups.shape[0], n_mels), [], []
        for i in range(t):
            out, stop, state, _ = self._step(prev.to(keys.dtype), state, keys, mask)
            frames.append(out)
            stops.append(stop)
            prev = groups[:, i, -n_mels:]  # teacher forcing: the true last frame of this step
        pred = torch.stack(frames, 1).float().reshape(target.shape)
        real = keep_mask(n_frames, t * r, pred.device)
        l1 = ((pred - target).abs().mean(-1) * real).sum() / real.sum()
        live = keep_mask(steps, t, pred.device)
        last = F.one_hot(torch.tensor(steps, device=pred.device) - 1, t).float()
        stop = F.binary_cross_entropy_with_logits(torch.stack(stops, 1).float(), last, reduction="none")
        return l1 + self.cfg.stop_weight * (stop * live).sum() / live.sum()

    @torch.no_grad()
    def synthesize(self, src: torch.Tensor, src_lengths: list[int] | None = None, max_steps: int | None = None,
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each row's (frames, n_mels) until its stop probability passes 1/2 (or ``max_steps``
        decoder steps), and its (steps, S) attention weights."""
        r, n_mels = self.cfg.reduction, self.cfg.audio.n_mels
        max_steps = max_steps or self.cfg.max_decoder_steps
        keys, mask = self.encode(src, src_lengths)
        state, prev = self._start(keys), keys.new_zeros(src.shape[0], n_mels)
        done = torch.full((src.shape[0],), max_steps, dtype=torch.long)
        frames, weights = [], []
        for i in range(max_steps):
            out, stop, state, w = self._step(prev, state, keys, mask)
            frames.append(out)
            weights.append(w)
            prev = out[:, -n_mels:]
            stopped = (stop > 0).cpu() & (done == max_steps)  # sync point: one read per step
            done[stopped] = i + 1
            if bool((done < max_steps).all()):
                break
        frames_all = torch.stack(frames, 1).reshape(src.shape[0], -1, n_mels)
        attn = torch.stack(weights, 1)
        return ([frames_all[b, : int(done[b]) * r] for b in range(src.shape[0])],
                [attn[b, : int(done[b])] for b in range(src.shape[0])])


@torch.no_grad()
def _init(model: TTS, seed: int, std: float) -> None:
    for name, p in model.named_parameters():
        if "bias" in name:
            p.zero_()
        else:
            seeded_normal_(p, seed, name, std)
    # The attention starts out moving half a character per step (about the pace of speech at
    # 4 frames of 10 ms a step) with components two characters wide (softplus(-0.43) ≈ 0.5,
    # softplus(1.8) + 0.1 ≈ 2): a broad sweep that training narrows and paces.
    k = model.cfg.mixtures
    last = model.attention.mlp[-1].bias
    last[k: 2 * k] = -0.43
    last[2 * k:] = 1.8
