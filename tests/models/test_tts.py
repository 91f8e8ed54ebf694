"""The speech synthesizer on its own: padding never changes a sentence's loss, the attention only
moves forward and never onto padding, synthesis stops at the stop token or the step limit, and
the FLOPs per sentence match torch's counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build
from models.sources import power_mel
from models.tts import FLOOR, SCALE, TTSConfig

CFG = TTSConfig(vocab_size=30, d_embed=16, d_encoder=16, d_prenet=16, d_decoder=32, d_attn=16, mixtures=3,
                reduction=3, dropout=0.0, prenet_dropout=0.0, pad_id=1)


def _sentence(seed: int, chars: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 30, (1, chars), generator=g), 0.3 * torch.randn(1, samples, generator=g)


def test_padding_changes_no_loss():
    """A sentence padded (characters with pad ids, sound with silence) inside a batch of two
    copies of itself has its own loss: masks reach the encoder, the attention and both losses."""
    model = build(CFG).eval()
    src, wave = _sentence(0, 12, 2000)
    alone = model(src, wave, [12], [2000])
    padded_src = torch.cat([src, torch.ones(1, 7, dtype=torch.long)], 1).repeat(2, 1)
    padded_wave = torch.cat([wave, torch.zeros(1, 1500)], 1).repeat(2, 1)
    together = model(padded_src, padded_wave, [12, 12], [2000, 2000])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    # Counted as the longer sentence the pad is, the loss differs: the lengths are what matter.
    assert not torch.allclose(model(padded_src, padded_wave, [19, 19], [3500, 3500]), alone)


def test_targets_are_the_scaled_log_mel_of_the_sound():
    model = build(CFG)
    _, wave = _sentence(1, 5, 3000)
    frames, n = model.log_mel(wave, [3000])
    reference = torch.log(power_mel(wave, model.fbank, 256, 80).clamp(min=FLOOR)) / SCALE
    torch.testing.assert_close(frames, reference)
    assert n == [frames.shape[1]] == [1 + (3000 - 256) // 80]


def test_attention_moves_forward_and_never_onto_padding():
    torch.manual_seed(0)
    model = build(CFG.model_copy(update={"prenet_dropout": 0.5})).eval()
    src = torch.randint(2, 30, (2, 10))
    src[1, 6:] = CFG.pad_id
    frames, weights = model.synthesize(src, [10, 6], max_steps=40)
    keys, mask = model.encode(src, [10, 6])
    state, prev, means = model._start(keys), keys.new_zeros(2, CFG.audio.n_mels), []
    for _ in range(20):
        out, _, state, w = model._step(prev, state, keys, mask)
        prev = out[:, -CFG.audio.n_mels:]
        means.append(state[3])
        assert (w[1, 6:] == 0).all() and (w >= 0).all()
    means = torch.stack(means)
    assert (means[1:] >= means[:-1]).all()
    assert all(w.shape[1] == 10 for w in weights) and all((w[:, 10:] == 0).all() for w in weights)


def test_synthesis_stops_at_the_stop_token_or_the_step_limit():
    model = build(CFG).eval()
    src, _ = _sentence(2, 8, 100)
    with torch.no_grad():
        model.stop_out.bias.fill_(-50.0)  # never stops
    frames, weights = model.synthesize(src, max_steps=7)
    assert frames[0].shape == (7 * CFG.reduction, CFG.audio.n_mels) and weights[0].shape == (7, 8)
    with torch.no_grad():
        model.stop_out.bias.fill_(50.0)  # stops after its first step
    frames, _ = model.synthesize(src.repeat(3, 1), max_steps=7)
    assert [f.shape[0] for f in frames] == [CFG.reduction] * 3
    wave = model.to_wave(frames[0])
    assert wave.shape == (CFG.audio.n_fft // 2 + (CFG.reduction - 1) * CFG.audio.hop,)


def test_flops_per_sentence_match_torch_flop_counter():
    model = build(CFG.model_copy(update={"d_decoder": 64, "d_encoder": 32}))
    chars, samples = 30, 80 * 200 + 176
    src = torch.randint(2, 30, (2, chars))
    wave = 0.1 * torch.randn(2, samples)
    with FlopCounterMode(display=False) as counter:
        model(src, wave).backward()
    frames = CFG.audio.frames(samples)
    assert model.flops_per_sample(frames, chars) == pytest.approx(counter.get_total_flops() / 2, rel=0.03)
