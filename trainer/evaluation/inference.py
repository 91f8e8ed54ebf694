"""Inference on one device from a checkpoint of any layout: sample from a language model,
translate with a sequence-to-sequence model, caption images, transcribe speech, speak text,
classify with a classifier, read text lines. ``seqtrain generate`` and ``eval`` use it, and so
does the decoding evaluation during training (``translate_ids``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from models.mdrnn import ctc_greedy
from trainer import checkpoint
from trainer.config import Config
from trainer.data import listops, textlines
from trainer.data.tokenizer import EOS
from trainer.errors import SeqtrainError


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer, Tokenizer, Config]:
    """(model in eval mode, source tokenizer, target tokenizer, config) of a checkpoint."""
    model, cfg, ckpt = checkpoint.load_model(path)
    src, tgt = checkpoint.run_tokenizers(ckpt)
    return model.to(device).eval(), src, tgt, cfg


@torch.no_grad()
def translate_ids(model: torch.nn.Module, sources: list[torch.Tensor], pad_id: int, eos: int,
                  max_len: int, beam: int = 1, length_penalty: float = 1.0,
                  device: torch.device | str = "cpu", batch: int = 64) -> list[list[int]]:
    """Greedy (beam 1) or beam-search target ids for sources (token ids, images or sounds),
    ``batch`` at a time (``source_batch``). The decoder starts from EOS, as in training."""
    outs: list[list[int]] = []
    for k in range(0, len(sources), batch):
        x, lengths = source_batch(model, sources[k: k + batch], pad_id)
        outs += model.translate(x.to(device), eos, eos, max_len=max_len, beam=beam,
                                length_penalty=length_penalty, src_lengths=lengths)
    return outs


def source_batch(model: torch.nn.Module, sources: list[torch.Tensor], pad_id: int,
                 ) -> tuple[torch.Tensor, list[int] | None]:
    """Sources as one batch tensor and, for sounds, their lengths: images stacked; sounds
    padded with silence; token ids padded, each cut to what the encoder can read (an
    official test set is not filtered by length as training pairs are)."""
    src = model.cfg.source
    if src is not None and src.kind == "image":
        return torch.stack(sources), None
    if src is not None:
        return torch.nn.utils.rnn.pad_sequence(sources, batch_first=True), [len(s) for s in sources]
    limit = getattr(model.cfg, "max_seq_len", None)
    ids = [s[:limit] for s in sources]
    return torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id), None


def encode_sources(tok: Tokenizer, texts: list[str], eos: int) -> list[torch.Tensor]:
    """Source token ids (an empty sentence becomes a lone EOS: the encoder needs one token)."""
    return [torch.tensor(tok.encode(s, add_special_tokens=False).ids or [eos]) for s in texts]


def generate_text(
    path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 50, top_p: float | None = None, seed: int = 0, num_samples: int = 1,
) -> list[str]:
    """Samples from a language model (GPT or RNN), prompt included."""
    model, tok, _, cfg = load_for_inference(path)
    if cfg.is_seq2seq:
        raise SeqtrainError(f"{path} is a {cfg.model.family} model: give --source text to translate")
    eos = tok.token_to_id(EOS)
    # An empty prompt starts at a document boundary, as training documents do.
    ids = [eos] + tok.encode(prompt, add_special_tokens=False).ids
    limit = getattr(cfg.model, "max_seq_len", None)  # recurrent models read any length
    if limit is not None and len(ids) > limit:
        print(f"the prompt's {len(ids)} tokens exceed model.max_seq_len={limit}: generating from its "
              f"last {limit}", file=sys.stderr, flush=True)
    x = torch.tensor([ids] * num_samples)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(x, max_new_tokens, temperature, top_k, top_p, stop_tokens=(eos,), generator=g)
    # Decode prompt and continuation together: BPE merges may span the boundary.
    return [tok.decode([i for i in row.tolist()[1:] if i != eos]) for row in out]


def translate(path: str | Path, sources: list[str], beam: int = 1, length_penalty: float = 1.0,
              max_len: int = 128) -> list[str]:
    """Greedy (beam 1) or beam-search outputs of a sequence-to-sequence model."""
    model, src_tok, tgt_tok, cfg = load_for_inference(path)
    if not cfg.is_seq2seq:
        raise SeqtrainError(f"{path} is a {cfg.model.family} language model: give --prompt instead")
    eos = tgt_tok.token_to_id(EOS)
    outs = translate_ids(model, encode_sources(src_tok, sources, eos), cfg.model.pad_id, eos, max_len,
                         beam, length_penalty, batch=len(sources) or 1)
    return [tgt_tok.decode(o) for o in outs]


@torch.no_grad()
def classify(model: torch.nn.Module, cfg: Config, trees: list[listops.Node], batch: int = 256) -> list[int]:
    """A classifier's label for each ListOps expression, ``batch`` at a time."""
    to_batch = listops.batcher(cfg.family.examples, getattr(cfg.model, "binary", False))
    out: list[int] = []
    for k in range(0, len(trees), batch):
        inputs = {n: v for n, v in to_batch(trees[k: k + batch]).items() if n != "labels"}
        out += model(**inputs).argmax(-1).tolist()
    return out


@torch.no_grad()
def read_lines(model: torch.nn.Module, images: list, batch: int = 64) -> list[str]:
    """A text-line recognizer's best-path transcription of each image (``textlines.read_image``
    or ``render`` arrays), ``batch`` at a time."""
    out: list[str] = []
    for k in range(0, len(images), batch):
        b = textlines.line_batch(images[k: k + batch])
        log_probs = model(b["images"], b["widths"])
        out += [textlines.decode(ids) for ids in ctc_greedy(log_probs, model.output_lengths(b["widths"]))]
    return out


def load_captioner(path: str | Path) -> tuple[torch.nn.Module, Tokenizer, Config]:
    """(model in eval mode, caption tokenizer, config) of an image captioner's checkpoint."""
    return _load_reader(path, "image", "an image captioner")


def load_transcriber(path: str | Path) -> tuple[torch.nn.Module, Tokenizer, Config]:
    """(model in eval mode, transcript tokenizer, config) of a speech recognizer's checkpoint."""
    return _load_reader(path, "audio", "a speech recognizer")


def _load_reader(path: str | Path, kind: str, what: str) -> tuple[torch.nn.Module, Tokenizer, Config]:
    model, _, tok, cfg = load_for_inference(path)
    source = cfg.source
    if source is None or source.kind != kind:
        reads = f"{source.kind} sources" if source is not None else "token sources"
        raise SeqtrainError(f"{path} is a {cfg.model.family} model of {reads}, not {what}")
    return model, tok, cfg


def load_synthesizer(path: str | Path) -> tuple[torch.nn.Module, Tokenizer, Config]:
    """(model in eval mode, character tokenizer, config) of a speech synthesizer's checkpoint."""
    model, tok, _, cfg = load_for_inference(path)
    if cfg.family.examples != "sounds":
        raise SeqtrainError(f"{path} is a {cfg.model.family} model, not a speech synthesizer")
    return model, tok, cfg


@torch.no_grad()
def speak(model: torch.nn.Module, tok: Tokenizer, texts: list[str], seed: int = 0, batch: int = 32,
          ) -> list[np.ndarray]:
    """A synthesizer's waveform of each text (float32 at ``model.cfg.audio.sample_rate``),
    ``batch`` at a time. The prenet's dropout stays on when synthesising (Tacotron 2), so the
    draws come from a generator seeded by ``seed``: the same call gives the same sounds."""
    ids = []
    for i, text in enumerate(texts):
        x = tok.encode(text, add_special_tokens=False).ids
        if not text.strip() or not x:
            raise SeqtrainError(f"text {i + 1} ({text!r}) is empty: give the words to say")
        ids.append(torch.tensor(x[: model.cfg.max_seq_len]))
    out: list[np.ndarray] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in range(0, len(ids), batch):
            src = torch.nn.utils.rnn.pad_sequence(ids[k: k + batch], batch_first=True, padding_value=model.cfg.pad_id)
            frames, _ = model.synthesize(src, [len(x) for x in ids[k: k + batch]])
            out += [model.to_wave(f).numpy() for f in frames]
    return out


def transcribe_ids(model: torch.nn.Module, cfg: Config, sounds: list[np.ndarray], eos: int, beam: int = 1,
                   length_penalty: float = 1.0) -> list[list[int]]:
    """Transcript ids of mono sounds at the model's rate, greedy (beam 1) or by beam search."""
    return translate_ids(model, [torch.from_numpy(a) for a in sounds], cfg.model.pad_id, eos, cfg.data.seq_len,
                         beam, length_penalty)


def caption_ids(model: torch.nn.Module, cfg: Config, images: list[np.ndarray], eos: int, beam: int = 1,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Caption ids of (C, H, W) images, greedy (beam 1) or by beam search."""
    return translate_ids(model, [torch.from_numpy(a) for a in images], cfg.model.pad_id, eos, cfg.data.seq_len,
                         beam, length_penalty)


def load_classifier(path: str | Path, kind: tuple[str, ...] = ("trees", "sequences")) -> tuple[torch.nn.Module, Config]:
    """(model in eval mode, config) of an example family's checkpoint: a classifier, or with
    ``kind=("images",)`` a text-line recognizer."""
    model, cfg, _ = checkpoint.load_model(path)
    if cfg.family.examples not in kind:
        what = "a text-line recognizer" if kind == ("images",) else "a classifier"
        raise SeqtrainError(f"{path} is a {cfg.model.family} model, not {what}")
    return model.eval(), cfg
