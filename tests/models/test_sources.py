"""Image and sound sources of the sequence-to-sequence families: FLOPs against torch's counter,
2-D positions, attention maps that are the weights the decoder really uses, mel filters against
the HTK scale and pure tones, padding invariance of sounds, and config checks."""

from __future__ import annotations

import pytest
import torch

from models import EncDecConfig, Seq2SeqRNNConfig, build
from models.positions import sinusoidal_grid, sinusoidal_table
from models.sources import (
    AudioEncoder,
    AudioSource,
    ImageSource,
    hz_to_mel,
    mel_filterbank,
    mel_to_wave,
    power_mel,
)
from tests.models.test_flops import counted_flops_per_token

CNN = {"kind": "image", "size": 16, "cnn_channels": [8, 16]}


def encdec(**kw) -> torch.nn.Module:
    return build(EncDecConfig(**{"n_enc_layers": 2, "n_dec_layers": 2, "n_head": 4, "d_model": 32,
                                 "max_seq_len": 16, "tgt_vocab_size": 50, "dropout": 0.0, "source": CNN, **kw}))


def test_grid_positions_give_rows_and_columns_their_own_channels():
    pe = sinusoidal_grid(3, 5, 8).view(3, 5, 8)
    assert torch.equal(pe[:, :, :4], sinusoidal_table(3, 4)[:, None, :].expand(3, 5, 4))
    assert torch.equal(pe[:, :, 4:], sinusoidal_table(5, 4)[None, :, :].expand(3, 5, 4))


@pytest.mark.parametrize("encoder", ["cnn", "patches"])
def test_image_captioner_flops_per_sample_match_torch_flop_counter(encoder):
    """Convolutions, the encoder over the grid, the decoder over the caption. The counter sees
    what autograd runs: the first convolution computes no gradient for the image itself, which
    ours counts (6 per weight and position), hence the upper bound within a few percent."""
    model = encdec(source={**CNN, "encoder": encoder})
    images, tgt = torch.rand(2, 3, 16, 16), torch.randint(2, 50, (2, 12))
    counted = counted_flops_per_token(model, {"src": images, "tgt_in": tgt, "labels": tgt}, 2)
    ours = model.flops_per_sample(12)
    assert counted <= ours <= 1.05 * counted, (ours, counted)
    assert model.flops_per_token(12)[0] == pytest.approx(ours / 12)


def test_attention_maps_are_the_cross_attention_weights_the_decoder_uses():
    """With one head, the last decoder layer's cross-attention output is o_proj(weights @ v):
    the maps reproduce what scaled_dot_product_attention computed inside the forward pass."""
    model = encdec(n_head=1).eval()
    images, tgt = torch.rand(3, 3, 16, 16), torch.randint(2, 50, (3, 7))
    seen = {}
    attn = model.decoder[-1].cross_attn
    hook = attn.register_forward_hook(lambda m, args, out: seen.update(out=out, mem=args[1]))
    model(images, tgt)
    hook.remove()
    w = model.attention_weights(images, tgt)
    assert w.shape == (3, 7, 16) and torch.allclose(w.sum(-1), torch.ones(3, 7))
    _, v = attn.kv_proj(seen["mem"]).chunk(2, -1)
    torch.testing.assert_close(attn.o_proj(w @ v), seen["out"], atol=1e-5, rtol=1e-5)


def test_recurrent_captioner_reads_the_grid_and_trains_its_convolutions():
    model = build(Seq2SeqRNNConfig(n_layers=1, d_embed=16, d_hidden=24, d_attn=16, tgt_vocab_size=40,
                                   dropout=0.0, source=CNN))
    images, tgt = torch.rand(2, 3, 16, 16), torch.randint(2, 40, (2, 5))
    model(images, tgt, tgt).backward()
    assert model.source.stem[0].weight.grad.abs().sum() > 0
    w = model.attention_weights(images, tgt)
    assert w.shape == (2, 5, 16) and torch.allclose(w.sum(-1), torch.ones(2, 5))
    out = model.translate(images, 1, 2, max_len=6, beam=3)
    assert len(out) == 2 and all(len(o) <= 6 for o in out)


def test_image_sources_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match=r"model.source.size=30 is not divisible by 2\^len\(model.source.cnn_channels\)=4"):
        ImageSource(size=30, cnn_channels=[8, 8])
    with pytest.raises(ValueError, match="model.source.patch=7"):
        ImageSource(size=32, encoder="patches", patch=7)
    with pytest.raises(ValueError, match="share_embeddings needs a token source"):
        EncDecConfig(source=CNN, share_embeddings=True)


AUDIO = {"kind": "audio", "sample_rate": 8000, "n_fft": 256, "hop": 80, "n_mels": 24, "conv_channels": [16, 16]}


def test_mel_filters_are_triangles_on_the_htk_scale_that_sum_to_one():
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor
    fb = mel_filterbank(129, 24, 8000)
    freqs = torch.linspace(0, 4000, 129)
    centres = 700.0 * (10 ** (torch.linspace(0, hz_to_mel(4000.0), 26)[1:-1] / 2595.0) - 1.0)
    between = (freqs >= centres[0]) & (freqs <= centres[-1])
    torch.testing.assert_close(fb[between].sum(1), torch.ones(int(between.sum())))  # neighbours cross at 1/2
    # Each peaks at the bin nearest its centre (or beside it, where a centre falls between bins).
    assert fb.max() <= 1.0 and ((fb.argmax(0) - (freqs[:, None] - centres).abs().argmin(0)).abs() <= 1).all()


def test_a_tone_lights_the_mel_band_around_its_frequency():
    enc = AudioEncoder(AudioSource(**AUDIO), 8)
    t = torch.arange(8000) / 8000
    for hz in (300.0, 1000.0, 2500.0):
        energy = torch.log(power_mel(torch.sin(2 * torch.pi * hz * t)[None], enc.fbank, 256, 80))
        band = int(energy[0].mean(0).argmax())
        centre = 700.0 * (10 ** (torch.linspace(0, hz_to_mel(4000.0), 26)[band + 1] / 2595.0) - 1.0)
        assert abs(float(centre) - hz) < 0.12 * hz + 40, (hz, float(centre))


@pytest.mark.parametrize("family", ["encdec", "rnn_seq2seq"])
def test_padding_a_sound_changes_nothing_the_model_computes(family):
    """A sound alone, and the same sound padded beside a longer one: equal encoder states at
    its real positions, equal next-token log-probabilities."""
    if family == "encdec":
        model = encdec(source=AUDIO).eval()
    else:
        model = build(Seq2SeqRNNConfig(n_layers=1, d_embed=16, d_hidden=24, d_attn=16, tgt_vocab_size=50,
                                       dropout=0.0, source=AUDIO)).eval()
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(1, 3000, generator=g) * 0.3, torch.randn(1, 5000, generator=g) * 0.3
    batch = torch.zeros(2, 5000)
    batch[0, :3000], batch[1] = short[0], long[0]
    tgt = torch.randint(2, 50, (2, 6), generator=g)
    alone = model(short, tgt[:1], src_lengths=[3000])
    padded = model(batch, tgt, src_lengths=[3000, 5000])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    assert model.source.positions(3000) == model.source(short, [3000])[0].shape[1]


def test_speech_recognizer_flops_per_sample_match_torch_flop_counter():
    model = encdec(source=AUDIO)
    wave, tgt = torch.randn(2, 16000) * 0.3, torch.randint(2, 50, (2, 12))
    counted = counted_flops_per_token(model, {"src": wave, "tgt_in": tgt, "labels": tgt,
                                              "src_lengths": [16000, 16000]}, 2)
    assert model.flops_per_sample(12, 16000) == pytest.approx(counted, rel=0.03)


def test_griffin_lim_rebuilds_a_sound_from_its_mel_frames():
    """espeak-ng's reading, to mel power and back: the rebuilt sound's mel frames lie close to
    the original's (log-mel L1 well under their spread), and closer with more iterations."""
    from trainer.data.speech import speak

    wave = torch.from_numpy(speak("the fifth of may, nineteen eighty-seven", "en-us", 160, 50, 8000))[None]
    fb = mel_filterbank(129, 40, 8000)
    mel = power_mel(wave, fb, 256, 80)[0]
    target = torch.log(mel + 1e-6)

    def error(n_iter: int) -> float:
        rebuilt = mel_to_wave(mel, fb, 256, 80, n_iter=n_iter)
        again = torch.log(power_mel(rebuilt[None], fb, 256, 80)[0] + 1e-6)
        n = min(len(again), len(target))
        return float((again[:n] - target[:n]).abs().mean())

    spread = float((target - target.mean()).abs().mean())
    few, many = error(2), error(32)
    assert many < 0.25 * spread and many < few, (few, many, spread)
