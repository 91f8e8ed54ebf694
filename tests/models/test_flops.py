"""FLOP accounting against torch's own FLOP counter on a real training step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import EncDecConfig, GPTConfig, build


def counted_flops_per_token(model, batch: dict, tokens: int) -> float:
    # The math kernel of SDPA is made of matmuls the counter sees (the fused CPU kernel is not
    # registered with it); it computes the full T x T scores, as our formula counts them.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch).backward()
    return counter.get_total_flops() / tokens


def test_gpt_flops_per_token_match_torch_flop_counter():
    cfg = GPTConfig(n_layer=3, n_head=4, d_model=64, max_seq_len=64, vocab_size=512)
    model = build(cfg)
    x = torch.randint(0, 512, (2, 64))
    counted = counted_flops_per_token(model, {"input_ids": x, "labels": x}, x.numel())
    exact, approx_6n = model.flops_per_token(64)
    # Ours counts every parameter of the blocks (norm gains, biases: not matmuls), torch only
    # matmuls: agreement within a few percent, and the 6N approximation is visibly off.
    assert exact == pytest.approx(counted, rel=0.03)
    assert abs(approx_6n - counted) / counted > 0.05


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_llama_shape_flops_per_token_match_torch_flop_counter(n_kv_head):
    """SwiGLU's three matrices and grouped-query attention's narrower k/v counted through the
    parameters; the scores over every query head; RoPE and norms not counted (elementwise)."""
    cfg = GPTConfig(n_layer=3, n_head=4, n_kv_head=n_kv_head, d_model=64, d_ff=176, max_seq_len=64,
                    vocab_size=512, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                    tie_embeddings=False)
    model = build(cfg)
    x = torch.randint(0, 512, (2, 64))
    counted = counted_flops_per_token(model, {"input_ids": x, "labels": x}, x.numel())
    exact, _ = model.flops_per_token(64)
    assert exact == pytest.approx(counted, rel=0.01)


def test_encdec_flops_per_token_match_torch_flop_counter():
    cfg = EncDecConfig(n_enc_layers=2, n_dec_layers=2, n_head=4, d_model=64, max_seq_len=32,
                       src_vocab_size=200, tgt_vocab_size=200, dropout=0.0)
    model = build(cfg)
    src, tgt = torch.randint(2, 200, (2, 32)), torch.randint(2, 200, (2, 32))
    counted = counted_flops_per_token(model, {"src": src, "tgt_in": tgt, "labels": tgt}, tgt.numel())
    exact, _ = model.flops_per_token(32)
    assert exact == pytest.approx(counted, rel=0.03)


@pytest.mark.parametrize("cell", ["tree_lstm", "binary_lstm", "tanh"])
def test_tree_rnn_flops_per_node_match_torch_flop_counter(cell):
    """Per node of a ListOps forest; ours an upper bound by the leaves' skipped input gradient."""
    from models import TreeRNNConfig
    from trainer.data.listops import batch_of, generate

    model = build(TreeRNNConfig(cell=cell, vocab_size=16, n_classes=10, d_model=64))
    batch = batch_of(generate(32, seed=0), binary=model.cfg.binary)
    counted = counted_flops_per_token(model, batch, len(batch["tokens"]))
    exact, _ = model.flops_per_token(0)
    assert counted <= exact <= 1.15 * counted


def test_transformer_classifier_flops_per_token_match_torch_flop_counter():
    """(``nn.LSTM``'s kernel is not seen by the counter: the LSTM encoder's 6 × weights is the
    same count as the RNN language model's.)"""
    from models import SeqClassifierConfig

    model = build(SeqClassifierConfig(encoder="transformer", vocab_size=16, n_classes=10, pad_id=15,
                                      d_model=64, n_layers=2, d_ff=256, max_len=32))
    x = torch.randint(0, 15, (4, 32))
    counted = counted_flops_per_token(model, {"input_ids": x, "lengths": [32] * 4, "labels": x[:, 0] % 10},
                                      x.numel())
    exact, _ = model.flops_per_token(32)
    assert exact == pytest.approx(counted, rel=0.01)


def test_md_lstm_flops_per_pixel_column_match_torch_flop_counter():
    """Per pixel column, two terms apart: the wavefront also runs the rows a diagonal does not
    cross (masked; ours counts the cells only), (H' + W' − 1) / W' times the recurrent products;
    and the first layer's input projection needs no input gradient (the pixels), 4 not 6.
    (``nn.LSTM``'s kernel, the baseline's, is not seen by the counter.)"""
    from models import TextLineConfig

    model = build(TextLineConfig(encoder="mdlstm", n_labels=40, d_hidden=16, n_layers=2))
    x = torch.rand(2, 32, 400)
    labels = torch.randint(1, 41, (2, 20))
    counted = counted_flops_per_token(model, {"images": x, "widths": [400, 400], "labels": labels,
                                              "label_lengths": [20, 20]}, 2 * 400)
    exact, _ = model.flops_per_token(0)
    rows, cols, pw = 32 // 4, 400 // 4, 4
    recurrent = sum(layer.UV.numel() for layer in model.layers) * rows / pw
    first_input = model.layers[0].W.numel() * rows / pw
    want = exact + 6 * recurrent * ((rows + cols - 1) / cols - 1) - 2 * first_input
    assert want == pytest.approx(counted, rel=0.01)
