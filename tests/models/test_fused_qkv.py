"""The fused q/k/v layout: exact round trips, whole heads in every tensor-parallel cut, and
checkpoints from before the fusion read under today's names."""

from __future__ import annotations

import pytest
import torch

from models import GPTConfig, build
from models.fused_qkv import fuse, legacy_names, split_heads, unfuse, upgrade


@pytest.mark.parametrize("n_parts", [2, 3])
def test_fuse_is_a_head_major_permutation_that_tensor_parallel_cuts_into_whole_heads(n_parts):
    n_head, hd, d = 4, 8, 32
    parts = [torch.randn(n_head * hd, d) for _ in range(n_parts)]
    fused = fuse(parts, hd)
    assert fused.shape == (n_parts * n_head * hd, d)
    for got, want in zip(unfuse(fused, hd, n_parts), parts, strict=True):
        assert torch.equal(got, want)
    # Rows of head h: its q rows, then its k rows, then its v rows.
    assert torch.equal(fused[n_parts * hd: n_parts * hd + hd], parts[0][hd: 2 * hd])
    for tp in (2, 4):
        for r in range(tp):
            assert torch.equal(fused.chunk(tp)[r], fuse([p.chunk(tp)[r] for p in parts], hd))
    # A projection's output splits into the heads SDPA takes.
    x = torch.randn(2, 5, d)
    outs = split_heads(x @ fused.t(), hd, n_parts)
    for got, p in zip(outs, parts, strict=True):
        assert torch.equal(got, (x @ p.t()).view(2, 5, n_head, hd).transpose(1, 2))


def test_a_state_dict_from_before_the_fusion_loads_into_todays_model():
    from trainer.checkpoint import load_weights

    c = GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=50)
    model = build(c, seed=1).eval()
    old = {}
    for k, v in model.state_dict().items():
        if ".c_attn." in k:
            for name, t in zip("qkv", unfuse(v, 8, 3), strict=True):
                old[k.replace("c_attn", f"{name}_proj")] = t.clone()
        else:
            old[k] = v.clone()
    assert sorted(legacy_names(list(old), "gpt")) == [f"h.{i}.attn.c_attn.{p}" for i in range(2) for p in ("bias", "weight")]
    assert upgrade(old, "gpt", 8).keys() == model.state_dict().keys()
    fresh = build(c, seed=2).eval()
    load_weights(fresh, old, label="old")
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
