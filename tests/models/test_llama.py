"""The GPT in its Llama shape against ``transformers``' ``LlamaForCausalLM`` built from the same
weights (random, from a config in the test: nothing is downloaded), and the presets' published
parameter counts."""

from __future__ import annotations

import pytest
import torch

from models import GPTConfig, build
from models.fused_qkv import fuse_groups, split_groups, unfuse_groups
from models.gpt import RopeScaling
from tests.conftest import REPO
from tools.export_hf import (
    gpt_config_of_llama,
    gpt_to_llama_state_dict,
    hf_class,
    llama_config,
    llama_to_gpt_state_dict,
)
from trainer.config import load_config
from trainer.errors import SeqtrainError

LLAMA = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64, vocab_size=97,
             position="rope", norm="rmsnorm", activation="swiglu", bias=False, norm_eps=1e-6)


def pair(seed: int = 0, **over) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, transformers') with the same random weights: transformers' own init, mapped in."""
    from transformers import LlamaForCausalLM

    cfg = GPTConfig(**{**LLAMA, **over})
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(cfg, cfg.vocab_size)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ours = build(cfg).eval()
    ours.load_state_dict(llama_to_gpt_state_dict(hf.state_dict(), cfg))
    return ours, hf


@pytest.mark.parametrize("over", [
    {}, {"tie_embeddings": False}, {"n_kv_head": 1}, {"n_kv_head": 4}, {"rope_theta": 500000.0},
    {"rope_theta": 500000.0, "rope_scaling": RopeScaling(factor=8.0, original_max_seq_len=16)},
], ids=["gqa-tied", "untied", "mqa", "mha", "theta", "llama3-scaling"])
def test_logits_equal_llama_for_causal_lm(over):
    ours, hf = pair(**over)
    x = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_the_weight_map_round_trips_and_the_config_reads_back():
    ours, hf = pair(tie_embeddings=False, rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=32))
    back = gpt_to_llama_state_dict(ours)
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    assert gpt_config_of_llama(hf.config, "here") == ours.cfg


def test_grouped_fusion_is_an_exact_permutation():
    q, k, v = torch.randn(12 * 8, 5), torch.randn(3 * 8, 5), torch.randn(3 * 8, 5)
    fused = fuse_groups(q, k, v, 8)
    assert all(torch.equal(a, b) for a, b in zip(unfuse_groups(fused, 8, 4), (q, k, v), strict=True))
    # The split gives query head j as q's head j, key/value head g as k's and v's head g.
    x = torch.randn(2, 7, 5)
    y = x @ fused.t()
    qs, ks, vs = split_groups(y, 8, 4)
    assert torch.allclose(qs, (x @ q.t()).view(2, 7, 12, 8).transpose(1, 2), atol=1e-6)
    assert torch.allclose(ks, (x @ k.t()).view(2, 7, 3, 8).transpose(1, 2), atol=1e-6)
    assert torch.allclose(vs, (x @ v.t()).view(2, 7, 3, 8).transpose(1, 2), atol=1e-6)


def test_greedy_generation_with_the_cache_equals_no_cache_and_transformers():
    ours, hf = pair()
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    cached = ours.generate(prompt, 20, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):  # no cache: the whole sequence every step
            seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], dim=1)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(cached, seq)
    assert torch.equal(cached, theirs)


def test_configurations_no_transformers_class_computes_are_refused_in_one_line():
    with pytest.raises(SeqtrainError, match=r"LlamaForCausalLM has no query/key norm\); --format safetensors") as e:
        hf_class(GPTConfig(**{**LLAMA, "qk_norm": True}))
    assert "\n" not in str(e.value)
    with pytest.raises(SeqtrainError, match=r"model.activation='gelu_tanh'"):
        hf_class(GPTConfig(**{**LLAMA, "activation": "gelu_tanh"}))
    assert hf_class(GPTConfig(**LLAMA)) == "llama" and hf_class(GPTConfig()) == "gpt2"


@pytest.mark.parametrize("bad, match", [
    ({"n_kv_head": 3}, "model.n_kv_head=3 does not divide model.n_head=4"),
    ({"d_model": 60, "n_head": 4, "n_kv_head": 1}, "model.position=rope needs an even head size"),
])
def test_bad_shapes_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**LLAMA, **bad})


def test_qk_norm_normalises_each_heads_queries_and_keys():
    """With QK-norm, scaling the fused projection leaves the output unchanged (the norms undo it
    for q and k; v is scaled, and v's scale passes through linearly)."""
    cfg = GPTConfig(**{**LLAMA, "qk_norm": True, "n_layer": 1, "norm_eps": 1e-12})
    m = build(cfg).eval()
    x = torch.randint(0, 97, (1, 16))
    attn = m.h[0].attn
    hd, g = cfg.head_dim, cfg.n_head // cfg.kv_heads
    h = m.h[0].ln_1(m.wte(x))
    with torch.no_grad():
        base, _ = attn(h)
        q, k, v = unfuse_groups(attn.c_attn.weight.clone(), hd, g)
        attn.c_attn.weight.copy_(fuse_groups(q * 3.0, k * 0.2, v, hd))
        scaled, _ = attn(h)
    assert torch.allclose(base, scaled, atol=1e-5)
    assert set(dict(m.named_parameters())) >= {"h.0.attn.q_norm.weight", "h.0.attn.k_norm.weight"}


# Published parameter counts (model cards); ours counted on the meta device.
PRESETS = {
    "gpt/llama-debug.yaml": None,
    "gpt/smollm2-135m.yaml": 134.5e6,
    "gpt/llama3.2-1b.yaml": 1.236e9,
    "gpt/gpt-7b.yaml": 8.03e9,  # Llama-3-8B's shape
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_have_their_published_parameter_counts(preset):
    from trainer.parallel.materialize import reference_model

    cfg = load_config(str(REPO / "configs" / preset), [])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 512
    n = reference_model(cfg).num_params()
    want = PRESETS[preset]
    if want is None:
        assert n < 5e6  # a laptop CPU's size
    else:
        assert abs(n - want) / want < 0.002, (n, want)


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_generation_past_the_context_slides_its_window_as_nanogpt_crops(shape):
    """A prompt longer than ``max_seq_len`` and generation past it: every token is the greedy
    choice on (at most) the last ``max_seq_len`` tokens of a window, never an error."""
    # A large init: attention then depends on the context, so a window one token off shows.
    cfg = GPTConfig(**({**LLAMA, "max_seq_len": 16} if shape == "llama" else
                       dict(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=97)), init_std=0.5)
    m = build(cfg, seed=1).eval()
    prompt = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    out = m.generate(prompt, 30, temperature=0)
    assert out.shape == (1, 70) and torch.equal(out[:, :40], prompt)
    seq, window = prompt, prompt[:, -16:]
    with torch.no_grad():  # the same rule without a cache: each token from its whole window
        for _ in range(30):
            nxt = m(window)[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            window = seq[:, -8:] if window.shape[1] == 16 else torch.cat([window, nxt], dim=1)
    assert torch.equal(out, seq)


def test_z_loss_is_palms_term_in_training_only():
    """``loss = CE + z · mean(log²Z)`` over the counted tokens, against a direct computation;
    evaluation mode reports the plain cross-entropy; the logged term is the mean since the last
    read."""
    from models.loss import TokenCrossEntropy

    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    fn = TokenCrossEntropy()
    fn.z_loss = 1e-2
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    keep = labels.flatten() != -100
    lse = logits.flatten(0, 1)[keep].logsumexp(-1)
    want = ce + 1e-2 * lse.square().mean()
    assert torch.allclose(fn(logits, labels), want.float(), atol=1e-6)
    fn(logits, labels)
    assert torch.allclose(fn.take_z_loss(), (1e-2 * lse.square().mean()).float(), atol=1e-7)
    assert fn.take_z_loss() is None  # reset by the read
    fn.eval()
    assert torch.allclose(fn(logits, labels), ce, atol=1e-7)
