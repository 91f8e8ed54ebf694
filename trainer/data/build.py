"""``build_data``: the prepared corpus as batches for the loop, and the config finished from it.

Data is prepared on one rank per node while the others wait (then read the cache), so every
rank calls ``build_data`` at the same point. The returned ``Data.cfg`` is the run's config with
the vocabulary sizes (and padding id) taken from the tokenizers: the only config the model and
the run directory see.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from trainer import distributed
from trainer.config import Config
from trainer.data import listops, scenes, speech, textlines
from trainer.data.examples import ExampleBatches
from trainer.data.mixture import MixtureBatches, MixtureEval, prepare_mixture
from trainer.data.sampler import LMBatches, StreamBatches, WindowDataset
from trainer.data.seq2seq import PairBatches, make_buckets, prepare_pairs, target_tensors
from trainer.data.shards import prepare
from trainer.data.tokenizer import EOS, PAD, cached_tokenizer
from trainer.errors import DataError
from trainer.parallel import ParallelDims


class Data(NamedTuple):
    cfg: Config
    """The run's config with vocabulary sizes (and ``pad_id``) filled in and checked."""
    train: Any
    """Training batches: ``micro_batch(step, micro, dp_rank)``, ``epoch_of(step)``; stateful
    ones (truncated BPTT) also ``after_forward``, ``state_dict`` and ``load_state_dict``."""
    val: Any
    """Validation batches: ``eval_batches(dp_rank, dp, n)``."""
    tokenizer_files: list[Path]
    """Tokenizer files copied into the run directory (and hashed into checkpoint manifests)."""
    decodable: Decodable | None = None
    """What decoding the validation pairs needs (sequence-to-sequence data), for the
    evaluations beside the validation loss (``trainer/evaluation/decode.py``)."""


class Decodable(NamedTuple):
    tokenizer: Any
    """The target side's tokenizer (detokenizes hypotheses)."""
    n: int
    """Validation examples there are to decode."""
    source: Callable[[int], torch.Tensor]
    """Example ``i``'s source as the model reads it: token ids, or an image."""
    references: Callable[[int], list[str]]
    """Example ``i``'s reference texts (one per pair; every caption of a scene)."""
    eos: int
    """End of sequence, also the decoder's start token."""
    transcribes: bool = False
    """The outputs are transcriptions, scored by error rates (CER, WER) rather than BLEU."""


def _say(msg: str) -> None:
    if distributed.rank() == 0:
        print(msg, flush=True)


def _on_local_rank0_first(fn):
    """Run ``fn`` on local rank 0 (which builds caches), then on the others (cache hits)."""
    if distributed.local_rank() == 0:
        out = fn(_say)
    distributed.barrier()
    if distributed.local_rank() != 0:
        out = fn(lambda _: None)
    return out


def build_data(cfg: Config, dims: ParallelDims) -> Data:
    """Tokenize (or read the cache), check there is enough data, and batch it."""
    if cfg.family.examples == "sounds":
        return _synthesis_data(cfg, dims)
    if cfg.family.examples:
        return _example_data(cfg, dims)
    source = cfg.source
    if source is not None:
        return (_caption_data if source.kind == "image" else _speech_data)(cfg, dims)
    return (_pair_data if cfg.family.pairs else _lm_data)(cfg, dims)


def _check_length(cfg: Config, split: str, ds: WindowDataset, rows: int) -> None:
    seq, tbptt = cfg.data.seq_len, cfg.data.tbptt
    need = (seq + 1) * rows if tbptt else seq + 1
    if len(ds.tokens) < need:
        raise DataError(
            f"{split} split of {cfg.data.source!r} has {len(ds.tokens)} tokens, fewer than one "
            f"window of data.seq_len={seq}{' per stream' if tbptt else ''}; use more "
            "data or a shorter seq_len"
        )


def _lm_data(cfg: Config, dims: ParallelDims) -> Data:
    if cfg.data.mixture is not None:
        return _mixture_data(cfg, dims)
    prep = _on_local_rank0_first(lambda log: prepare(cfg.data, log=log))
    cfg = cfg.with_vocab({"src": prep.vocab_size}, prep.dir)
    seq, t = cfg.data.seq_len, cfg.train
    train = WindowDataset(prep.split_path("train"), prep.dtype, seq)
    val = WindowDataset(prep.split_path("val"), prep.dtype, seq)
    _check_length(cfg, "train", train, t.micro_batch_size * (t.grad_accum if cfg.data.tbptt else 1) * dims.dp)
    _check_length(cfg, "val", val, t.micro_batch_size * dims.dp)
    files = [prep.dir / "tokenizer.json"]
    if cfg.data.tbptt:
        b = StreamBatches(train, val, t.micro_batch_size, t.grad_accum, dims.dp)
        return Data(cfg, b, b, files)
    eos = prep.meta["eos_id"] if cfg.data.document_mask else None
    return Data(cfg, LMBatches(train, t.micro_batch_size, t.grad_accum, dims.dp, t.seed, cfg.data.sampling, eos),
                LMBatches(val, t.micro_batch_size, 1, dims.dp, t.seed, document_eos=eos), files)


def _pair_data(cfg: Config, dims: ParallelDims) -> Data:
    t = cfg.train
    prep = _on_local_rank0_first(lambda log: prepare_pairs(cfg.data, t.seed, log=log))
    cfg = cfg.with_vocab(prep.meta["vocab_size"], prep.dir, pad_id=prep.meta["pad_id"])
    eos, pad = prep.meta["eos_id"], cfg.model.pad_id
    train_split, val_split = prep.split("train"), prep.split("val")
    buckets, dropped = make_buckets(train_split, cfg.data.seq_len, t.micro_batch_size, cfg.data.max_tokens, t.seed)
    if dropped:
        _say(f"skipped {dropped} training pairs longer than data.seq_len={cfg.data.seq_len}")
    val_buckets, _ = make_buckets(val_split, cfg.data.seq_len, t.micro_batch_size, cfg.data.max_tokens, t.seed)
    # BOS of the decoder is the EOS token (as GPT-2 does): no extra symbol to learn.
    train_b = PairBatches(train_split, buckets, t.grad_accum, dims.dp, pad, eos, eos, t.seed)
    val_b = PairBatches(val_split, val_buckets, 1, dims.dp, pad, eos, eos, t.seed, shuffle=False)
    tok = prep.tokenizer("tgt")
    decodable = Decodable(tok, len(val_split), lambda i: torch.from_numpy(val_split.src(i).astype("int64")),
                          lambda i: [tok.decode(val_split.tgt(i).tolist())], eos)
    return Data(cfg, train_b, val_b, prep.tokenizer_files(), decodable)


def _text_side(cfg: Config, texts: dict[str, list[str]], side: str = "tgt",
               ) -> tuple[Config, Tokenizer, Path, dict[str, list]]:
    """The text side of a pair whose other side is no text (captions and transcripts: the
    target; text read aloud: the source): ``data.tokenizer.path`` or a tokenizer trained on the
    training texts (cached, built on local rank 0 first), the config finished from it, and
    every split's texts as token ids, checked to fit the model (a target with its EOS)."""
    t = cfg.data.tokenizer
    tok_file = Path(t.path) if t.path else _on_local_rank0_first(lambda log: cached_tokenizer(
        t.kind, t.vocab_size, texts["train"], cfg.data.resolved_cache_dir() / "tokenizers", log))
    tok = Tokenizer.from_file(str(tok_file))
    pad, eos = tok.token_to_id(PAD), tok.token_to_id(EOS)
    if pad is None or eos is None:
        raise DataError(f"data.tokenizer.path={str(tok_file)!r}: no {PAD!r} and {EOS!r} tokens")
    cfg = cfg.with_vocab({side: tok.get_vocab_size()}, tok_file, pad_id=pad)
    ids = {k: [tok.encode(x, add_special_tokens=False).ids for x in v] for k, v in texts.items()}
    longest = max(len(x) for v in ids.values() for x in v) + (side == "tgt")
    if longest > cfg.model.max_seq_len:
        raise DataError(f"the {'target' if side == 'tgt' else 'source'} texts need {longest} positions but "
                        f"model.max_seq_len={cfg.model.max_seq_len}; raise it")
    return cfg, tok, tok_file, ids


def _caption_data(cfg: Config, dims: ParallelDims) -> Data:
    """Images and their captions: the scenes of the embedded task, rendered when their batch
    is built (every rank draws them; seconds), with a tokenizer trained on the training
    captions (cached, built on local rank 0 first)."""
    src = cfg.model.source
    if (src.channels, src.size) != (3, scenes.IMAGE_SIZE):
        raise DataError(f"model.source.channels={src.channels}, model.source.size={src.size}: the scenes are "
                        f"RGB, {scenes.IMAGE_SIZE} pixels square; set 3 and {scenes.IMAGE_SIZE}")
    splits = scenes.read_splits(cfg.data, cfg.train.seed)
    cfg, tok, tok_file, ids = _text_side(cfg, {k: s.targets for k, s in splits.items()})
    pad, eos = cfg.model.pad_id, tok.token_to_id(EOS)

    def collate(split: scenes.SceneSplit):
        return lambda idx: {"src": split.images(idx),
                            **target_tensors([ids[split.name][i] for i in idx], pad, eos, eos)}

    sizes = {k: (len(v), collate(v)) for k, v in splits.items()}
    _say(f"{cfg.data.source}: " + ", ".join(f"{k} {n}" for k, (n, _) in sizes.items()) + " scenes")
    val = splits["val"]
    decodable = Decodable(tok, len(val), lambda i: torch.from_numpy(val.image(i)), val.references, eos)
    return Data(cfg, _examples(cfg, dims, sizes, "train"), _examples(cfg, dims, sizes, "val"), [tok_file],
                decodable)


def _mixture_data(cfg: Config, dims: ParallelDims) -> Data:
    """``data.mixture``: each source prepared on its own with one tokenizer, drawn by weight."""
    prepared = _on_local_rank0_first(lambda log: prepare_mixture(cfg.data, log=log))
    first = prepared[0][1]
    cfg = cfg.with_vocab({"src": first.vocab_size}, first.dir)
    seq, t = cfg.data.seq_len, cfg.train
    eos = first.meta["eos_id"] if cfg.data.document_mask else None
    train, val = {}, []
    for m, prep in prepared:
        where = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": m.source})})
        train_ds = WindowDataset(prep.split_path("train"), prep.dtype, seq)
        val_ds = WindowDataset(prep.split_path("val"), prep.dtype, seq)
        _check_length(where, "train", train_ds, 1)
        _check_length(where, "val", val_ds, t.micro_batch_size * dims.dp)
        train[m.label] = (m.weight, train_ds)
        val.append((m.label, m.weight, LMBatches(val_ds, t.micro_batch_size, 1, dims.dp, t.seed, document_eos=eos)))
    batches = MixtureBatches(train, t.micro_batch_size, t.grad_accum, dims.dp, t.seed, eos, say=_say)
    return Data(cfg, batches, MixtureEval(val), [first.dir / "tokenizer.json"])


def _example_data(cfg: Config, dims: ParallelDims) -> Data:
    """Labelled examples: ListOps expressions as trees or token sequences, or rendered text
    lines. Generating, parsing or rendering them takes seconds, deterministically, so every
    rank does it and nothing is cached."""
    t = cfg.train
    where = f"data.source={cfg.data.source!r}"
    if cfg.family.examples == "images":
        lines = textlines.read_splits(cfg.data, t.seed)
        cfg = cfg.with_vocab({"labels": len(textlines.ALPHABET)}, where)
        if cfg.model.height != textlines.HEIGHT:
            raise DataError(f"model.height={cfg.model.height}: the text lines are rendered {textlines.HEIGHT} "
                            "pixels high; set it to that")
        splits = {k: (len(v), v.batch) for k, v in lines.items()}
    else:
        exprs = listops.read_splits(cfg.data, t.seed)
        trees = cfg.family.examples == "trees"
        binary = getattr(cfg.model, "binary", False)  # the binary Tree-LSTM reads binarized trees
        sizes = {"nodes": len(listops.BINARY_VOCAB if binary else listops.VOCAB), "tokens": listops.SEQ_PAD + 1,
                 "classes": listops.N_CLASSES}
        cfg = cfg.with_vocab(sizes, where, pad_id=None if trees else listops.SEQ_PAD)
        to_batch = listops.batcher(cfg.family.examples, binary)

        def collate(xs, ys):
            return lambda idx: to_batch([xs[i] for i in idx], [ys[i] for i in idx])

        splits = {k: (len(xs), collate(xs, ys)) for k, (xs, ys) in exprs.items()}

    _say(f"{cfg.data.source}: " + ", ".join(f"{k} {n}" for k, (n, _) in splits.items()) + " examples")
    return Data(cfg, _examples(cfg, dims, splits, "train"), _examples(cfg, dims, splits, "val"), [])


def _examples(cfg: Config, dims: ParallelDims, splits: dict[str, tuple[int, Any]], split: str) -> ExampleBatches:
    """``split``'s examples (count, collate) as micro-batches: training ones shuffled with
    gradient accumulation, validation ones in order."""
    t = cfg.train
    n, collate = splits[split]
    if n < t.micro_batch_size * dims.dp:
        raise DataError(f"the {split} split of data.source={cfg.data.source!r} has {n} examples, fewer than "
                        f"one micro-batch per rank ({t.micro_batch_size} x dp {dims.dp})")
    return ExampleBatches(n, collate, t.micro_batch_size, t.grad_accum if split == "train" else 1, dims.dp, t.seed)


def _short_enough(train: speech.SpeechSplit, max_seconds: float, key: str) -> np.ndarray:
    """Indices of the training sounds no longer than ``max_seconds`` (the setting ``key``)."""
    keep = np.flatnonzero(train.seconds() <= max_seconds)
    if len(keep) < len(train):
        _say(f"skipped {len(train) - len(keep)} training sounds longer than {key}={max_seconds:g}")
    return keep


def _speech_data(cfg: Config, dims: ParallelDims) -> Data:
    """Sounds and their transcripts: espeak-ng's readings of the embedded sentences
    (synthesised and cached on local rank 0 first), padded with silence per batch; a
    tokenizer trained on the training transcripts. Training sounds longer than
    ``model.source.max_seconds`` are left out."""
    src = cfg.model.source
    splits = _on_local_rank0_first(lambda log: speech.read_splits(cfg.data, cfg.train.seed, src.sample_rate, log))
    cfg, tok, tok_file, ids = _text_side(cfg, {k: s.texts for k, s in splits.items()})
    pad, eos = cfg.model.pad_id, tok.token_to_id(EOS)
    keep = _short_enough(splits["train"], src.max_seconds, "model.source.max_seconds")

    def collate(split: speech.SpeechSplit, order: np.ndarray):
        def batch(idx):
            wave, lengths = speech.sound_batch([split.sound(int(order[i])) for i in idx])
            return {"src": wave, **target_tensors([ids[split.name][order[i]] for i in idx], pad, eos, eos),
                    "src_lengths": lengths}
        return batch

    sizes = {"train": (len(keep), collate(splits["train"], keep)),
             "val": (len(splits["val"]), collate(splits["val"], np.arange(len(splits["val"]))))}
    _say(f"{cfg.data.source}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " sounds")
    val = splits["val"]
    decodable = Decodable(tok, len(val), lambda i: torch.from_numpy(val.sound(i)), lambda i: [val.texts[i]], eos,
                          transcribes=True)
    return Data(cfg, _examples(cfg, dims, sizes, "train"), _examples(cfg, dims, sizes, "val"), [tok_file],
                decodable)


def _synthesis_data(cfg: Config, dims: ParallelDims) -> Data:
    """Texts and espeak-ng's readings of them, the other way round from ``_speech_data``: the
    characters are the source (a tokenizer trained on the training texts), the sound the
    target. Training sounds longer than ``model.audio.max_seconds`` are left out."""
    audio = cfg.model.audio
    splits = _on_local_rank0_first(lambda log: speech.read_splits(cfg.data, cfg.train.seed, audio.sample_rate, log))
    cfg, _, tok_file, ids = _text_side(cfg, {k: s.texts for k, s in splits.items()}, side="src")
    pad = cfg.model.pad_id
    keep = _short_enough(splits["train"], audio.max_seconds, "model.audio.max_seconds")

    def collate(split: speech.SpeechSplit, order: np.ndarray):
        def batch(idx):
            rows = [torch.tensor(ids[split.name][order[i]]) for i in idx]
            wave, lengths = speech.sound_batch([split.sound(int(order[i])) for i in idx])
            return {"src": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad),
                    "src_lengths": [len(x) for x in rows], "wave": wave, "wave_lengths": lengths}
        return batch

    sizes = {"train": (len(keep), collate(splits["train"], keep)),
             "val": (len(splits["val"]), collate(splits["val"], np.arange(len(splits["val"]))))}
    _say(f"{cfg.data.source}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " sentences")
    return Data(cfg, _examples(cfg, dims, sizes, "train"), _examples(cfg, dims, sizes, "val"), [tok_file])
