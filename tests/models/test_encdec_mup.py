"""μP for the encoder-decoder (``model.mup``): the standard parametrisation at the base width,
the multipliers equal to a standard model with them folded into its weights, the init, the
optimizer groups, and a coordinate check: after 3 Adam steps the logits keep their size as the
width grows under μP and grow under the standard parametrisation.

Bounds of the coordinate check: least-squares slope of log(mean |logit|) against log(width) over
widths 32..256 (2 seeds): μP within ±0.15 (at most 2^0.45 ≈ 1.4× across 8× the width), SP at
least +0.5, as ``tests/tools/test_coord_check.py`` asks of the decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import EncDecConfig, build
from models.fused_qkv import split_heads
from trainer.engine.initialize import param_groups

V = 64
SRC = torch.randint(2, V, (8, 12), generator=torch.Generator().manual_seed(0))
TGT = torch.randint(2, V, (8, 10), generator=torch.Generator().manual_seed(1))


def tiny(**kw) -> EncDecConfig:
    base = dict(n_enc_layers=2, n_dec_layers=2, n_head=4, d_model=64, max_seq_len=16, src_vocab_size=V,
                tgt_vocab_size=V, dropout=0.0, label_smoothing=0.0, tie_output=False)
    base.update(kw)
    return EncDecConfig(**base)


def test_at_the_base_width_mup_is_the_standard_parametrisation():
    sp, mup = build(tiny(), seed=3), build(tiny(mup={"base_width": 64}), seed=3)
    for (name, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(sp(SRC, TGT), mup(SRC, TGT))


def test_multipliers_equal_the_standard_model_with_them_folded_in():
    """μP's attention scale ``attn_mult / head_dim`` is the standard ``1/√head_dim`` with every
    query row times ``attn_mult / √head_dim``; its embeddings' ``√base_width`` is the standard
    ``√d_model`` with the tables times ``√(base / d)``; its logits are the standard model's times
    ``output_mult · base / width``."""
    cfg = tiny(mup={"base_width": 16, "output_mult": 2.0})
    mup, sp = build(cfg, seed=1), build(tiny(), seed=1)
    sp.load_state_dict(mup.state_dict())
    hd = cfg.d_model // cfg.n_head
    fold = cfg.attn_scale * math.sqrt(hd)
    assert cfg.attn_scale == pytest.approx(math.sqrt(16 / 4) / hd)
    with torch.no_grad():
        for layer in [*sp.encoder, *sp.decoder]:
            for t in (layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias):
                t.view(cfg.n_head, 3, hd, *t.shape[1:])[:, 0] *= fold
        for layer in sp.decoder:
            layer.cross_attn.q_proj.weight *= fold
            layer.cross_attn.q_proj.bias *= fold
        for table in (sp.src_embed.weight, sp.tgt_embed.weight):
            table *= math.sqrt(16 / 64)
    assert cfg.readout_mult == pytest.approx(2.0 * 16 / 64)
    torch.testing.assert_close(mup(SRC, TGT), sp(SRC, TGT) * cfg.readout_mult, rtol=1e-5, atol=1e-6)


def test_init_and_learning_rates_shrink_hidden_matrices_only():
    """Measured standard deviations: hidden matrices ∝ 1/√width, embeddings and head fixed; the
    optimizer groups give hidden matrices lr/m and everything else lr."""
    stds = {}
    for width in (64, 256):
        m = build(tiny(d_model=width, src_vocab_size=2000, tgt_vocab_size=2000, mup={"base_width": 64}), seed=0)
        stds[width] = {n: p.std().item() for n, p in m.named_parameters() if p.ndim == 2}
    fixed = ("src_embed.weight", "tgt_embed.weight", "out.weight")
    for name in stds[64]:
        assert stds[256][name] / stds[64][name] == pytest.approx(1.0 if name in fixed else 0.5, rel=0.05), name
    cfg = tiny(d_model=256, mup={"base_width": 64})
    model = build(cfg, seed=0)
    groups = param_groups(model, 0.1, lr=1e-3, lr_mult=cfg.lr_mult)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        hidden = p.ndim == 2 and name not in fixed
        assert lr_of[id(p)] == pytest.approx(1e-3 / 4 if hidden else 1e-3), name


def test_query_zero_init_zeroes_the_queries_only():
    m = build(tiny(mup={"base_width": 32, "query_zero_init": True}), seed=0)
    layer = m.decoder[0]
    q, k, v = split_heads(layer.self_attn.qkv_proj(torch.randn(1, 5, 64)), 16, 3)
    assert q.abs().max() == 0 and k.abs().min() > 0 and v.abs().min() > 0
    assert layer.cross_attn.q_proj.weight.abs().max() == 0 and layer.cross_attn.kv_proj.weight.abs().min() > 0


def _logit_size(width: int, mup: bool, seed: int, steps: int = 3) -> float:
    cfg = tiny(d_model=width, mup={"base_width": 32} if mup else None)
    model = build(cfg, seed=seed)
    opt = torch.optim.AdamW(param_groups(model, 0.0, lr=1e-2, lr_mult=cfg.lr_mult if mup else None), lr=1e-2)
    labels = torch.roll(TGT, -1, 1)
    for _ in range(steps):
        opt.zero_grad()
        model(SRC, TGT, labels).backward()
        opt.step()
    with torch.no_grad():
        return model(SRC, TGT).abs().mean().item()


def test_coordinate_check_logits_keep_their_size_under_mup_and_grow_under_sp():
    widths = [32, 64, 128, 256]
    slopes = {}
    for mup in (True, False):
        sizes = [np.mean([_logit_size(w, mup, seed) for seed in (0, 1)]) for w in widths]
        slopes[mup] = np.polyfit(np.log(widths), np.log(sizes), 1)[0]
    print(f"logit slope: μP {slopes[True]:+.3f}, SP {slopes[False]:+.3f}")  # for the record (pytest -s)
    assert abs(slopes[True]) <= 0.15 and slopes[False] >= 0.5, slopes


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"model.mup.base_width=128 is wider than model.d_model=64"):
        tiny(mup={"base_width": 128})
    with pytest.raises(ValueError, match=r"model.mup: μP is defined here for token sources; model.source.kind=image"):
        tiny(mup={"base_width": 32}, source={"kind": "image"}, src_vocab_size=None)
