"""Greedy and beam search on hand-built next-token distributions."""

from __future__ import annotations

import math

import torch

from models import EncDecConfig, Seq2SeqRNNConfig, build
from models.decoding import beam_search, greedy

EOS, BOS, A, B = 0, 3, 1, 2


def table_model(table: dict[tuple[int, ...], dict[int, float]]):
    """step_fn from a table prefix -> {token: prob}; unknown prefixes end the sequence."""

    def step(rows, prefix):
        out = torch.full((prefix.shape[0], 4), -1e9)
        for r, p in enumerate(prefix.tolist()):
            for tok, prob in table.get(tuple(p), {EOS: 1.0}).items():
                out[r, tok] = math.log(prob)
        return out

    return step


# Greedy takes A (0.6), then EOS (0.35): p = 0.21. The best sequence is B EOS: p = 0.4.
TRAP = {(BOS,): {A: 0.6, B: 0.4}, (BOS, A): {EOS: 0.35, A: 0.34, B: 0.31}, (BOS, B): {EOS: 1.0}}


def test_beam_search_finds_the_sequence_greedy_misses():
    step = table_model(TRAP)
    assert greedy(step, 1, BOS, EOS, 5) == [[A]]
    assert beam_search(step, 1, BOS, EOS, 5, beam=2, length_penalty=0.0) == [[B]]


def test_beam_one_equals_greedy_on_real_models():
    torch.manual_seed(0)
    src = torch.randint(2, 30, (4, 8))
    for cfg in (
        EncDecConfig(n_enc_layers=1, n_dec_layers=1, d_model=16, n_head=2, src_vocab_size=30,
                     tgt_vocab_size=30, dropout=0.0),
        Seq2SeqRNNConfig(d_embed=8, d_hidden=16, d_attn=8, n_layers=1, src_vocab_size=30,
                         tgt_vocab_size=30, dropout=0.0),
    ):
        model = build(cfg, seed=5).eval()
        with torch.no_grad():
            step = model.decoder_step_fn(src)
            g = greedy(step, 4, 0, 0, 12)
            b = beam_search(step, 4, 0, 0, 12, beam=1, length_penalty=0.0)
        assert g == b and any(len(x) > 1 for x in g)
        assert model.translate(src, 0, 0, max_len=12, beam=1) == g


def test_a_source_longer_than_the_positions_is_cut_to_them():
    """Official test sets are not length-filtered: a 40-token source on a 16-position encoder
    translates as its first 16 tokens do (it once crashed the end-of-training evaluation)."""
    from trainer.evaluation.inference import translate_ids

    cfg = EncDecConfig(n_enc_layers=1, n_dec_layers=1, d_model=16, n_head=2, src_vocab_size=30,
                       tgt_vocab_size=30, dropout=0.0, max_seq_len=16)
    model = build(cfg, seed=5).eval()
    long = torch.randint(2, 30, (40,))
    assert translate_ids(model, [long], 1, 0, 12) == translate_ids(model, [long[:16]], 1, 0, 12)
