"""Image sources of the sequence-to-sequence families: FLOPs against torch's counter, 2-D
positions, attention maps that are the weights the decoder really uses, and config checks."""

from __future__ import annotations

import pytest
import torch

from models import EncDecConfig, Seq2SeqRNNConfig, build
from models.positions import sinusoidal_grid, sinusoidal_table
from models.sources import ImageSource
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
