"""Source encoders: what turns a picture or a sound into the sequence an encoder-decoder attends over.

A sequence-to-sequence family reads token ids by default (``model.source: null``). With
``model.source`` set, its source embedding is replaced by one of these encoders, and the rest of
the family (the Transformer or bidirectional-RNN encoder, the decoder, beam search) is unchanged:

- ``kind: image``, ``encoder: cnn``: 3×3 convolutions with ReLU, each followed by 2×2 max
  pooling (Show, Attend and Tell's annotation vectors, in small), then a 1×1 projection to the
  encoder's width; ``encoder: patches``: non-overlapping patches projected linearly (ViT).
  Either way the grid is read in raster order, with 2-D sinusoidal positions added.
- ``kind: audio``: log-mel frames (``torch.stft`` power spectrum times a triangular mel filter
  bank, log, LayerNorm over each frame), then 1-D convolutions of stride 2 that shorten the
  sequence (as Whisper and Conformer front ends do), a projection and sinusoidal positions.

Batch contract: images are ``src`` (B, channels, size, size) floats in [0, 1], all of one size,
so no row is padded and the encoder output has no mask. Sounds are ``src`` (B, samples) mono
waveforms in [-1, 1] at ``sample_rate``, padded with zeros, and ``src_lengths`` (host ints) their
real lengths; each encoder returns its output lengths, from which the family masks padding.
Padding cannot change a real frame: frames lie wholly inside the signal (no centring), and
padded frames are zeroed before and after every convolution, as the zero padding of an
unpadded signal would be.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.init import count_params
from models.positions import sinusoidal_grid, sinusoidal_table


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

    def forward(self, images: torch.Tensor, lengths: list[int] | None = None) -> tuple[torch.Tensor, None]:
        x = self.stem(images).flatten(2).transpose(1, 2)  # raster order: row by row
        return x + self.pe.to(x.dtype), None

    def default_units(self) -> int:
        return 0  # every image is one size

    def positions(self, n: int | None = None) -> int:
        """Source positions the encoder reads (the grid, whatever ``n``)."""
        return self.cfg.grid ** 2

    def flops(self, n: int | None = None) -> float:
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


class MelFrames(BaseModel):
    """A sound's sample rate and the log-mel frames cut from it: what an audio source encoder
    reads and what a speech synthesiser writes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    sample_rate: int = Field(8000, ge=1000)
    """Samples per second a waveform must have."""
    channels: Literal[1] = 1
    """Mono: a file of more channels is refused, not mixed down unseen."""
    n_fft: int = Field(256, ge=16)
    """STFT window and FFT size in samples (32 ms at 8 kHz)."""
    hop: int = Field(80, ge=1)
    """Samples between frames (10 ms at 8 kHz)."""
    n_mels: int = Field(40, ge=4)
    """Mel bands."""
    max_seconds: float = Field(6.0, gt=0)
    """Longest sound trained on (longer pairs are skipped); FLOPs per token assume it."""

    def frames(self, samples: int) -> int:
        """Whole STFT frames inside ``samples`` (at least one: shorter sounds are zero-padded)."""
        return 1 + max(0, samples - self.n_fft) // self.hop


class AudioSource(MelFrames):
    """Sounds as the source of a sequence-to-sequence model."""

    kind: Literal["audio"] = "audio"
    """What the source is."""
    conv_channels: list[int] = Field(default_factory=lambda: [128, 128], min_length=1)
    """Output channels of each 1-D convolution (kernel 3, stride 2: each halves the frames)."""


def hz_to_mel(f: float) -> float:
    """The HTK mel scale: 2595 log10(1 + f / 700) (on the host: meta builds call it too)."""
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters with peaks of 1, their centres evenly spaced on the
    mel scale from 0 Hz to Nyquist (HTK; what ``torchaudio.functional.melscale_fbanks`` gives
    with ``norm=None, mel_scale="htk"``)."""
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mels = torch.linspace(0, hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10 ** (mels / 2595.0) - 1.0)  # back to Hz
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class AudioEncoder(nn.Module):
    """(B, samples) waveforms and their lengths ► (B, frames / 2^convs, d_out) and lengths."""

    def __init__(self, cfg: AudioSource, d_out: int) -> None:
        super().__init__()
        self.cfg, self.d_out = cfg, d_out
        self.register_buffer("fbank", mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate),
                             persistent=False)
        self.norm = nn.LayerNorm(cfg.n_mels)
        chans = [cfg.n_mels, *cfg.conv_channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 3, stride=2, padding=1) for a, b in pairwise(chans))
        self.proj = nn.Linear(chans[-1], d_out)

    def init_buffers(self, device: torch.device) -> None:
        self.fbank = mel_filterbank(self.cfg.n_fft // 2 + 1, self.cfg.n_mels, self.cfg.sample_rate).to(device)

    def frames(self, samples: int) -> int:
        return self.cfg.frames(samples)

    def default_units(self) -> int:
        return round(self.cfg.max_seconds * self.cfg.sample_rate)

    def positions(self, samples: int) -> int:
        n = self.frames(samples)
        for _ in self.convs:
            n = (n - 1) // 2 + 1
        return n

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, frames, n_mels) log-mel energies, normalised per frame."""
        if wave.shape[1] < self.cfg.n_fft:
            wave = torch.nn.functional.pad(wave, (0, self.cfg.n_fft - wave.shape[1]))
        return self.norm(torch.log(power_mel(wave, self.fbank, self.cfg.n_fft, self.cfg.hop) + 1e-6).to(wave.dtype))

    def forward(self, wave: torch.Tensor, lengths: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        lengths = [self.frames(n) for n in (lengths or [wave.shape[1]] * wave.shape[0])]
        x = self.log_mel(wave).transpose(1, 2)  # (B, n_mels, frames)
        for conv in self.convs:
            x = _zero_after(x, lengths)
            x = torch.nn.functional.gelu(conv(x))
            lengths = [(n - 1) // 2 + 1 for n in lengths]
        x = self.proj(_zero_after(x, lengths).transpose(1, 2))
        return x + sinusoidal_table(x.shape[1], self.d_out).to(x.device, x.dtype), lengths

    def flops(self, samples: int) -> float:
        """Training FLOPs of one sound of ``samples``: the mel projection (forward only: no
        gradient flows into the waveform, and the filters are fixed), and 6 per weight and
        output position of each convolution and of the projection. The FFT is not a matmul
        and is left out."""
        n = self.frames(samples)
        total = 2.0 * n * self.fbank.numel()
        for conv in self.convs:
            n = (n - 1) // 2 + 1
            total += 6.0 * conv.weight.numel() * n
        return total + 6.0 * self.proj.weight.numel() * n


def power_mel(wave: torch.Tensor, fbank: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, frames, n_mels) mel power of whole frames (no centring) under a Hann window."""
    spec = torch.stft(wave.float(), n_fft, hop, window=torch.hann_window(n_fft, device=wave.device), center=False,
                      return_complex=True).abs().square()
    return spec.transpose(1, 2) @ fbank


@torch.no_grad()
def mel_to_wave(mel: torch.Tensor, fbank: torch.Tensor, n_fft: int, hop: int, n_iter: int = 32,
                momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """A waveform whose ``power_mel`` is close to ``mel`` (frames, n_mels): the linear power
    spectrum by least squares through the filter bank's pseudo-inverse, then its phase by
    Griffin-Lim (fast Griffin-Lim's momentum, as torchaudio's) with ``torch.stft``/``istft``.

    Griffin-Lim frames are centred; ``n_fft / 2`` leading zeros put frame ``t``'s centre where
    the analysis window of ``power_mel`` has it, so the two line up frame for frame."""
    power = (mel.double() @ torch.linalg.pinv(fbank.double())).clamp(min=0).float()
    magnitude = power.sqrt().T  # (freqs, frames)
    window = torch.hann_window(n_fft, device=mel.device)
    g = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(magnitude),
                         2 * math.pi * torch.rand(magnitude.shape, generator=g).to(mel.device))
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        wave = torch.istft(magnitude * angles, n_fft, hop, window=window)
        rebuilt = torch.stft(wave, n_fft, hop, window=window, return_complex=True)[:, : magnitude.shape[1]]
        angles = rebuilt - momentum / (1 + momentum) * previous
        angles = angles / angles.abs().clamp(min=1e-8)
        previous = rebuilt
    wave = torch.istft(magnitude * angles, n_fft, hop, window=window)
    return torch.cat([wave.new_zeros(n_fft // 2), wave])


def keep_mask(lengths: list[int], n: int, device: torch.device) -> torch.Tensor:
    """(B, n) booleans: True at the positions before each row's length (host ints)."""
    return torch.arange(n, device=device) < torch.tensor(lengths, device=device)[:, None]


def _zero_after(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, C, T) with every column at or past its row's length zeroed."""
    if min(lengths) == x.shape[-1]:
        return x
    return x * keep_mask(lengths, x.shape[-1], x.device)[:, None, :].to(x.dtype)


SourceConfig = Annotated[ImageSource | AudioSource, Field(discriminator="kind")]
"""Any source config; the ``kind`` field selects the member."""
ENCODERS = {"image": ImageEncoder, "audio": AudioEncoder}


def source_encoder(cfg: ImageSource | AudioSource, d_out: int) -> nn.Module:
    return ENCODERS[cfg.kind](cfg, d_out)


def source_cost(encoder: nn.Module | None, src_len: int | None, tgt_len: int) -> tuple[float, int, int]:
    """(training FLOPs of the source encoder, positions the model's encoder reads after it, its
    parameters) for one source of ``src_len`` in its own units: tokens (no source encoder;
    default ``tgt_len``), samples of a sound (default ``max_seconds``), an image (any)."""
    if encoder is None:
        return 0.0, src_len or tgt_len, 0
    units = src_len or encoder.default_units()
    return encoder.flops(units), encoder.positions(units), count_params(encoder)
