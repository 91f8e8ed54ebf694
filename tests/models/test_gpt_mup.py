"""μP (``model.mup``) against the standard parametrisation it must reduce to, and against the
same model computed with the multipliers folded into its weights."""

from __future__ import annotations

import math

import pytest
import torch

from models import GPTConfig, build
from models.fused_qkv import split_groups


def tiny(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, max_seq_len=16, vocab_size=50, tie_embeddings=False)
    base.update(kw)
    return GPTConfig(**base)


IDS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", [{}, {"position": "rope", "norm": "rmsnorm", "activation": "swiglu",
                                        "n_kv_head": 2, "bias": False, "tie_embeddings": True}],
                         ids=["gpt2", "llama"])
def test_at_the_base_width_mup_is_the_standard_parametrisation(shape):
    sp, mup = build(tiny(**shape), seed=3), build(tiny(**shape, mup={"base_width": 64}), seed=3)
    for (name, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(sp(IDS), mup(IDS))


@pytest.mark.parametrize("kv", [None, 2])
def test_attention_scale_and_logit_multiplier_equal_the_standard_model_with_them_folded_in(kv):
    """μP's attention ``attn_mult / head_dim`` equals the standard ``1/√head_dim`` with the
    query rows multiplied by ``attn_mult / √head_dim``, and its logits are the standard model's
    times ``output_mult · base / width`` (the head has no bias)."""
    cfg = tiny(n_kv_head=kv, mup={"base_width": 16, "output_mult": 2.0})
    mup = build(cfg, seed=1)
    sp = build(tiny(n_kv_head=kv), seed=1)
    sp.load_state_dict(mup.state_dict())
    fold = cfg.attn_scale * math.sqrt(cfg.head_dim)
    assert cfg.attn_scale == pytest.approx(math.sqrt(16 / 4) / 16)  # √(base head size) / head size
    group = cfg.n_head // cfg.kv_heads
    with torch.no_grad():
        for block in sp.h:
            for t in (block.attn.c_attn.weight, block.attn.c_attn.bias):
                t.view(cfg.kv_heads, group + 2, cfg.head_dim, *t.shape[1:])[:, :group] *= fold
    assert cfg.readout_mult == pytest.approx(2.0 * 16 / 64)
    torch.testing.assert_close(mup(IDS), sp(IDS) * cfg.readout_mult, rtol=1e-5, atol=1e-6)


def test_init_shrinks_hidden_matrices_by_root_width_and_keeps_the_rest():
    """Measured standard deviations: hidden matrices ∝ 1/√width, embeddings and head fixed."""
    stds = {}
    for width in (64, 256):
        m = build(tiny(d_model=width, vocab_size=2000, mup={"base_width": 64}), seed=0)
        stds[width] = {n: p.std().item() for n, p in m.named_parameters() if p.ndim == 2}
    for name in stds[64]:
        ratio = stds[256][name] / stds[64][name]
        want = 1.0 if name in ("wte.weight", "wpe.weight", "lm_head.weight") else 0.5
        assert ratio == pytest.approx(want, rel=0.05), name


def test_query_zero_init_zeroes_the_queries_only():
    m = build(tiny(n_kv_head=2, mup={"base_width": 32, "query_zero_init": True}), seed=0)
    q, k, v = split_groups(m.h[0].attn.c_attn(torch.randn(1, 5, 64)), 16, 2)
    assert q.abs().max() == 0 and k.abs().min() > 0 and v.abs().min() > 0


def test_base_width_wider_than_the_model_is_refused():
    with pytest.raises(ValueError, match=r"model.mup.base_width=128 is wider than model.d_model=64"):
        tiny(mup={"base_width": 128})
