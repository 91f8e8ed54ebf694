"""Sequence classifiers: a padded batch gives each sequence the logits it has alone."""

from __future__ import annotations

import pytest
import torch

from models import SeqClassifierConfig, build


def _model(encoder: str):
    return build(SeqClassifierConfig(encoder=encoder, vocab_size=16, n_classes=10, pad_id=15, d_model=32,
                                     n_layers=2, n_heads=4, d_ff=64, max_len=40, init_std=0.2), seed=3).eval()


def _batch(lengths: list[int]):
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), max(lengths)), 15)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(0, 15, (n,), generator=g)
    return ids


def test_lstm_classifier_reads_each_sequence_to_its_own_end():
    """Reference: ``nn.LSTM`` run on the unpadded sequence alone, its top layer's last state."""
    model, lengths = _model("lstm"), [7, 3, 12, 1]
    ids = _batch(lengths)
    logits = model(ids, lengths)
    for r, n in enumerate(lengths):
        out, _ = model.encoder(model.embed(ids[r: r + 1, :n]))
        assert torch.allclose(logits[r], model.head(out[0, -1]), atol=1e-6)


def test_transformer_classifier_ignores_padding():
    model, lengths = _model("transformer"), [7, 3, 12, 1]
    ids = _batch(lengths)
    logits = model(ids, lengths)
    for r, n in enumerate(lengths):
        alone = model(ids[r: r + 1, :n], [n])
        assert torch.allclose(logits[r], alone[0], atol=1e-5)
    assert not torch.allclose(logits[0], logits[1])


def test_a_sequence_longer_than_the_positions_is_refused():
    with pytest.raises(ValueError, match="max_len=40"):
        _model("transformer")(torch.zeros(1, 41, dtype=torch.long), [41])
