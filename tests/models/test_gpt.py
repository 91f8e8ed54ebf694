"""GPT against independent references: causality, the closed-form parameter count, HF GPT-2."""

from __future__ import annotations

import pytest
import torch

from models import GPTConfig, build


def tiny(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=16, vocab_size=50)
    base.update(kw)
    return GPTConfig(**base)


def test_causal_mask_future_tokens_do_not_change_past_logits():
    model = build(tiny()).eval()
    x = torch.randint(0, 50, (2, 12))
    ref = model(x)
    for j in (3, 7, 11):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 50
        out = model(y)
        torch.testing.assert_close(out[:, :j], ref[:, :j], rtol=0, atol=0)
        assert not torch.allclose(out[:, j], ref[:, j])  # the changed position itself does change


@pytest.mark.parametrize("bias,tie", [(True, True), (False, True), (True, False)])
def test_parameter_count_matches_closed_form(bias, tie):
    c = tiny(bias=bias, tie_embeddings=tie, d_ff=48)
    d, f, v, p, n = c.d_model, c.ff_size, c.vocab_size, c.max_seq_len, c.n_layer
    b = 1 if bias else 0
    per_block = (4 * d * d + 4 * d * b) + (2 * d * f + (f + d) * b) + 2 * (d + d * b)
    expected = v * d + p * d + n * per_block + (d + d * b) + (0 if tie else v * d)
    assert build(c).num_params() == expected


def test_weights_are_seeded_by_name_not_construction_order():
    a, b = build(tiny(), seed=3), build(tiny(), seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=na)
    # A deeper model shares the first blocks' initial weights: a stage built alone agrees.
    deep = dict(build(tiny(n_layer=4), seed=3).named_parameters())
    torch.testing.assert_close(deep["h.1.attn.c_attn.weight"], dict(a.named_parameters())["h.1.attn.c_attn.weight"])
    assert not torch.equal(dict(build(tiny(), seed=4).named_parameters())["wte.weight"], a.wte.weight)


@pytest.mark.parametrize(("activation", "hf_activation"), [("gelu_tanh", "gelu_new"), ("gelu", "gelu")])
def test_logits_equal_transformers_gpt2(activation, hf_activation):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tools.export_hf import HF_ACTIVATION, gpt_to_gpt2_state_dict

    # A wide init puts the MLP's inputs where the two GELUs differ (~1e-3 at |x| ~ 2).
    c = tiny(dropout=0.0, activation=activation, init_std=0.3)
    assert HF_ACTIVATION[activation] == hf_activation
    ours = build(c, seed=1).eval()
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, activation_function=hf_activation, layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )).eval()
    missing, unexpected = hf.load_state_dict(gpt_to_gpt2_state_dict(ours), strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing)
    x = torch.randint(0, c.vocab_size, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)


def test_kv_cache_generation_equals_full_recomputation():
    model = build(tiny(), seed=2).eval()
    prompt = torch.randint(0, 50, (2, 4))
    cached = model.generate(prompt, max_new_tokens=10, temperature=0)
    x = prompt
    with torch.no_grad():
        for _ in range(10):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, x)


def test_kv_cache_prefill_of_several_tokens_matches_one_pass():
    model = build(tiny(), seed=2).eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full, _ = model._forward(x)
        head, caches = model._forward(x[:, :4])
        tail, _ = model._forward(x[:, 4:], caches, start_pos=4)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=0, atol=1e-5)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    from models.gpt import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    picks = {sample_next(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(200)}
    assert picks == {1, 3}  # p(1) ≈ 0.46 < 0.6, so token 3 (≈ 0.42) completes the nucleus


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_documents_compute_what_they_compute_one_by_one(position):
    """``document_ids``: a window packing three documents (the last cut by the window) gives
    each token the logits it has when its document runs alone, so the packed loss is the
    documents' losses summed; without the ids, later documents see earlier ones."""
    from models.gpt import GPT, GPTConfig

    extra = {} if position == "learned" else dict(position="rope", norm="rmsnorm", n_kv_head=1)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=24, vocab_size=50, **extra)
    model = GPT(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 50, (n,), generator=g) for n in (7, 9, 12)]
    window = torch.cat(docs)[:24]  # the third document cut after 8 tokens
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate((7, 9, 8))])
    with torch.no_grad():
        packed = model(window[None], document_ids=ids[None])[0]
        alone = torch.cat([model(d[None, : min(len(d), 24 - s)])[0]
                           for d, s in zip(docs, (0, 7, 16), strict=True)])
        mixed = model(window[None])[0]
    assert (packed - alone).abs().max() < 1e-5
    assert (mixed[7:] - alone[7:]).abs().max() > 1e-2  # unmasked, the second document sees the first
