"""Single-device model definitions. No torch.distributed, no DeepSpeed here.

``build(cfg, seed)`` maps a model config (selected by its ``family`` field) to an ``nn.Module``.
Every family's ``forward(**batch)`` returns the training loss when the batch carries labels
(the RNN language model also returns its recurrent state, for truncated BPTT); classifiers
(trees, sequences) return logits without labels, the text-line recognizer log-probabilities;
the speech synthesiser returns its loss for text and the waveforms it should say.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from models.encdec import EncDecConfig, EncoderDecoder
from models.gpt import GPT, GPTConfig
from models.mdrnn import TextLineConfig, TextLineRecognizer
from models.rnn import RNNLM, RNNLMConfig, Seq2SeqRNN, Seq2SeqRNNConfig
from models.seq_classifier import SeqClassifier, SeqClassifierConfig
from models.tree_rnn import TreeRNN, TreeRNNConfig
from models.tts import TTS, TTSConfig

ModelConfig = Annotated[
    GPTConfig | EncDecConfig | RNNLMConfig | Seq2SeqRNNConfig | TreeRNNConfig | SeqClassifierConfig
    | TextLineConfig | TTSConfig,
    Field(discriminator="family"),
]
"""Any model config; the ``family`` field selects the member."""

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "encdec": (EncDecConfig, EncoderDecoder),
    "rnn_lm": (RNNLMConfig, RNNLM),
    "rnn_seq2seq": (Seq2SeqRNNConfig, Seq2SeqRNN),
    "tree_rnn": (TreeRNNConfig, TreeRNN),
    "seq_classifier": (SeqClassifierConfig, SeqClassifier),
    "mdrnn": (TextLineConfig, TextLineRecognizer),
    "tts": (TTSConfig, TTS),
}


def build(cfg, seed: int = 0) -> nn.Module:
    """Build the model described by ``cfg`` with deterministic, name-seeded initial weights."""
    return FAMILIES[cfg.family][1](cfg, seed=seed)


__all__ = ["FAMILIES", "GPTConfig", "EncDecConfig", "RNNLMConfig",
           "Seq2SeqRNNConfig", "TreeRNNConfig", "SeqClassifierConfig", "TextLineConfig", "TTSConfig", "ModelConfig",
           "build"]
