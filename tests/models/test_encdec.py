"""Encoder-decoder Transformer: torch.nn reference layers, masking, causality, positions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import EncDecConfig, build
from models.fused_qkv import unfuse
from models.positions import sinusoidal_table

PAD = 1


def tiny(**kw) -> EncDecConfig:
    base = dict(n_enc_layers=2, n_dec_layers=2, n_head=4, d_model=32, d_ff=64, max_seq_len=24,
                src_vocab_size=40, tgt_vocab_size=30, dropout=0.0, label_smoothing=0.0, pad_id=PAD)
    base.update(kw)
    return EncDecConfig(**base)


def test_sinusoidal_table_matches_the_paper():
    pe = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


def _copy_attention(ours, ref: nn.MultiheadAttention) -> None:
    """torch's in_proj holds q, k and v block after block; ours is head-major (fused_qkv.py)."""
    def blocks(part: str) -> torch.Tensor:
        if ours.cross:
            return torch.cat([getattr(ours.q_proj, part), *unfuse(getattr(ours.kv_proj, part), ours.head_dim, 2)])
        return torch.cat(unfuse(getattr(ours.qkv_proj, part), ours.head_dim, 3))

    with torch.no_grad():
        ref.in_proj_weight.copy_(blocks("weight"))
        ref.in_proj_bias.copy_(blocks("bias"))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)


def _copy_ff_norms(ours, ref, subs) -> None:
    with torch.no_grad():
        ref.linear1.load_state_dict(ours.ff.fc1.state_dict())
        ref.linear2.load_state_dict(ours.ff.fc2.state_dict())
        for i, sub in enumerate(subs, 1):
            getattr(ref, f"norm{i}").load_state_dict(sub.norm.state_dict())


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_layers_equal_torch_transformer_layers(norm):
    """Our encoder and decoder layers compute what torch.nn's reference layers compute."""
    torch.manual_seed(0)
    model = build(tiny(norm=norm), seed=3).eval()
    kw = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True,
              norm_first=norm == "pre")
    enc_ref, dec_ref = nn.TransformerEncoderLayer(**kw).eval(), nn.TransformerDecoderLayer(**kw).eval()
    enc, dec = model.encoder[0], model.decoder[0]
    _copy_attention(enc.self_attn, enc_ref.self_attn)
    _copy_ff_norms(enc, enc_ref, [enc.sub1, enc.sub2])
    _copy_attention(dec.self_attn, dec_ref.self_attn)
    _copy_attention(dec.cross_attn, dec_ref.multihead_attn)
    _copy_ff_norms(dec, dec_ref, [dec.sub1, dec.sub2, dec.sub3])

    x, y = torch.randn(3, 9, 32), torch.randn(3, 6, 32)
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[0, 6:] = False  # padding in the first source
    with torch.no_grad():
        ours_enc = enc(x, keep[:, None, None, :])
        ref_enc = enc_ref(x, src_key_padding_mask=~keep)
        torch.testing.assert_close(ours_enc[keep], ref_enc[keep], rtol=0, atol=1e-5)
        ours_dec = dec(y, ours_enc, None, keep[:, None, None, :])
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        ref_dec = dec_ref(y, ours_enc, tgt_mask=causal, memory_key_padding_mask=~keep)
        torch.testing.assert_close(ours_dec, ref_dec, rtol=0, atol=1e-5)


def test_padded_source_tokens_change_no_output():
    model = build(tiny(), seed=1).eval()
    src = torch.randint(2, 40, (2, 10))
    src[0, 7:] = PAD
    tgt = torch.randint(2, 30, (2, 5))
    ref = model(src, tgt)
    other = src.clone()
    other[0, 7:] = 5  # garbage where the mask says padding... but it is no longer padding:
    other_pad = src.clone()
    with torch.no_grad():
        # Longer padding on row 0 must equal the original row (extra pad columns are ignored).
        wider = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
        torch.testing.assert_close(model(wider, tgt), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(model(other, tgt)[0], ref[0])  # real tokens there do matter
    assert torch.equal(other_pad, src)


def test_decoder_is_causal():
    model = build(tiny(), seed=1).eval()
    src, tgt = torch.randint(2, 40, (2, 8)), torch.randint(2, 30, (2, 7))
    ref = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 30
    torch.testing.assert_close(model(src, changed)[:, :4], ref[:, :4], rtol=0, atol=0)


def test_shared_embeddings_and_label_smoothing():
    model = build(tiny(share_embeddings=True, src_vocab_size=30), seed=0)
    assert model.src_embed is model.tgt_embed and model.out.weight is model.src_embed.weight
    smooth = build(tiny(label_smoothing=0.1), seed=0).train()
    plain = build(tiny(label_smoothing=0.0), seed=0).train()
    src, tgt = torch.randint(2, 40, (2, 8)), torch.randint(2, 30, (2, 7))
    logits = plain(src, tgt)
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(smooth(src, tgt, tgt), expected, rtol=0, atol=1e-6)


def test_unpadded_batches_attend_without_masks_and_match_the_masked_path(monkeypatch):
    """The batch's host-side source lengths: no padding, so no mask anywhere and the decoder's
    self-attention as ``is_causal`` (what flash attention needs); the same outputs as the
    masked path. A padded batch keeps its padding mask."""
    import torch.nn.functional as F

    model = build(tiny(), seed=1).eval()
    src, tgt = torch.randint(2, 40, (2, 8)), torch.randint(2, 30, (2, 7))
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    with torch.no_grad():
        masked = model(src, tgt)  # no lengths: masks as before
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        fast = model(src, tgt, src_lengths=[8, 8])
        assert set(calls) == {(True, False), (True, True)}  # encoder/cross: no mask; decoder: causal
        torch.testing.assert_close(fast, masked, rtol=0, atol=1e-6)
        calls.clear()
        src[1, 5:] = PAD
        padded = model(src, tgt, src_lengths=[8, 5])
        assert (False, False) in calls and (True, True) in calls
        torch.testing.assert_close(padded, model(src, tgt), rtol=0, atol=0)
