"""RNN baselines: truncated BPTT, Bahdanau attention masking, scheduled sampling."""

from __future__ import annotations

import pytest
import torch

from models import RNNLMConfig, Seq2SeqRNNConfig, build
from models.rnn import detach_state
from trainer.config import ScheduledSamplingConfig

PAD = 1


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_tbptt_windows_equal_one_pass_and_gradients_stop_at_the_edge(cell):
    cfg = RNNLMConfig(cell=cell, n_layers=2, d_embed=16, d_hidden=16, dropout=0.0, vocab_size=20)
    model = build(cfg, seed=0).eval()
    seq = torch.cat([torch.randint(0, 10, (3, 8)), torch.randint(10, 20, (3, 8))], dim=1)
    with torch.no_grad():
        full, _ = model(seq)
        a, state = model(seq[:, :8])
        b, _ = model(seq[:, 8:], state=state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-5)

    def window2_grad(detach: bool) -> torch.Tensor:
        model.zero_grad()
        _, st = model(seq[:, :8])
        loss, _ = model(seq[:, 8:15], seq[:, 9:16], state=detach_state(st) if detach else st)
        loss.backward()
        return model.embed.weight.grad[:10].abs().sum()  # rows used only by window 1

    assert window2_grad(detach=True) == 0
    assert window2_grad(detach=False) > 0


def s2s(**kw) -> Seq2SeqRNNConfig:
    base = dict(cell="gru", n_layers=2, d_embed=16, d_hidden=24, d_attn=12, dropout=0.0,
                src_vocab_size=30, tgt_vocab_size=25, pad_id=PAD)
    base.update(kw)
    return Seq2SeqRNNConfig(**base)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_attention_sums_to_one_ignores_padding_and_padding_changes_nothing(cell):
    model = build(s2s(cell=cell), seed=0).eval()
    src = torch.randint(2, 30, (3, 9))
    src[1, 5:] = PAD
    tgt = torch.randint(2, 25, (3, 6))
    w = model.attention_weights(src, tgt)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 6), rtol=0, atol=1e-6)
    assert torch.all(w[1, :, 5:] == 0) and torch.all(w[1, :, :5] > 0)
    with torch.no_grad():
        ref = model(src, tgt)
        wider = torch.cat([src, torch.full((3, 3), PAD)], dim=1)  # more padding columns
        torch.testing.assert_close(model(wider, tgt), ref, rtol=0, atol=1e-5)
        # Row 1 alone, without any padding, gives the same outputs as inside the padded batch.
        torch.testing.assert_close(model(src[1:2, :5], tgt[1:2]), ref[1:2], rtol=0, atol=1e-5)


def test_scheduled_sampling_schedule_is_the_configured_line():
    ss = ScheduledSamplingConfig(eps_start=0.1, eps_end=0.5, start_step=100, span=200)
    assert [ss.eps(s) for s in (0, 100, 200, 300, 1000)] == pytest.approx([0.1, 0.1, 0.3, 0.5, 0.5])


def test_sampling_prob_feeds_own_predictions():
    model = build(s2s(), seed=0).train()  # dropout 0: train mode only switches sampling on
    src, tgt = torch.randint(2, 30, (4, 7)), torch.randint(2, 25, (4, 6))
    teacher = model(src, tgt)
    model.sampling_prob = 1.0
    own = model(src, tgt)
    # Always fed its own argmax: the same as teacher forcing on its own greedy outputs.
    greedy_in = torch.cat([tgt[:, :1], own.argmax(-1)[:, :-1]], dim=1)
    model.sampling_prob = 0.0
    torch.testing.assert_close(model(src, greedy_in), own, rtol=0, atol=1e-5)
    assert not torch.allclose(own, teacher)
