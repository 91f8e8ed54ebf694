"""``seqtrain generate CKPT``: sample from a language model, translate with a
sequence-to-sequence model, classify with a classifier (the value of ListOps expressions) or
read text-line images, or speak text with a speech synthesizer:
a checkpoint of any layout, on one device."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import SeqtrainError


def register(sub) -> None:
    g = sub.add_parser("generate", help="sample from a language model or translate with a "
                       "sequence-to-sequence model (checkpoint or run directory)")
    g.add_argument("checkpoint", help="run directory, checkpoints folder or checkpoint")
    g.add_argument("--prompt", default="", help="language models: text to continue")
    g.add_argument("--source", action="append", default=[],
                   help="sequence-to-sequence: a source sentence (repeatable)")
    g.add_argument("--input", type=Path, help="sequence-to-sequence: a file of source lines; "
                   "classifiers: a file of ListOps expressions")
    g.add_argument("--image", action="append", default=[], type=Path,
                   help="text-line recognizers: a grey image of one line of text; image captioners: "
                   "an image of the size the model reads (repeatable)")
    g.add_argument("--audio", action="append", default=[], type=Path,
                   help="speech recognizers: a mono 16-bit WAV file at the model's sample rate (repeatable)")
    g.add_argument("--text", action="append", default=[],
                   help="speech synthesizers: a sentence to say (repeatable); needs --wav")
    g.add_argument("--wav", type=Path,
                   help="speech synthesizers: where to write the sound (with several texts, NAME-1.wav, NAME-2.wav, ...)")
    g.add_argument("--attention-png", type=Path,
                   help="image captioners: where to write the attention map of each word (with several "
                   "images, NAME-1.png, NAME-2.png, ...)")
    g.add_argument("--expression", action="append", default=[],
                   help="classifiers: a ListOps expression to evaluate, e.g. '[MAX 2 [MIN 4 7 ] 0 ]' (repeatable)")
    g.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(run=main)


ASKS = {"trees": "--expression or --input (ListOps expressions)", "sequences": "--expression or --input (ListOps expressions)",
        "images": "--image FILE", "sounds": '--text "what to say" --wav OUT.wav'}
"""What to give a model of each example kind (``FamilySpec.examples``)."""


def _examples_kind(path: str) -> tuple[str | None, str]:
    """(example kind or None, family) of a checkpoint."""
    from trainer import checkpoint

    cfg = checkpoint.saved_config(checkpoint.resolve(path))
    return cfg.family.examples, cfg.model.family


def _numbered(path: Path, k: int, n: int, suffix: str) -> Path:
    """Where output ``k`` of ``n`` goes: ``path`` itself for one, else ``NAME-k.SUFFIX``."""
    return path if n == 1 else path.with_name(f"{path.stem}-{k}{path.suffix or suffix}")


def main(args: argparse.Namespace) -> int:
    from trainer.evaluation.inference import generate_text, translate

    if args.expression:
        return _classify(args)
    if args.image:
        return _read_images(args)
    if args.audio:
        return _transcribe(args)
    if args.text or args.wav:
        return _speak(args)
    kind, family = _examples_kind(args.checkpoint)
    if kind in ("trees", "sequences") and args.input:
        return _classify(args)
    if kind:
        raise SeqtrainError(f"{args.checkpoint} is a {family} model: give {ASKS[kind]}")
    if args.source or args.input:
        sources = list(args.source)
        if args.input:
            if not args.input.is_file():
                raise SeqtrainError(f"--input {args.input}: no such file")
            sources += [line for line in args.input.read_text().splitlines() if line.strip()]
        outs = translate(args.checkpoint, sources, args.beam, args.length_penalty)
        for src, out in zip(sources, outs, strict=True):
            print(f"{src}\t{out}")
        return 0
    samples = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, args.seed, args.num_samples)
    for i, s in enumerate(samples):
        print(f"----- sample {i} -----\n{s}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    """Each expression (``--expression``, then the lines of ``--input``) and the model's value."""
    from trainer.data import listops
    from trainer.evaluation.inference import classify, load_classifier

    model, cfg = load_classifier(args.checkpoint)
    trees = [listops.parse(e, f"--expression {i + 1}") for i, e in enumerate(args.expression)]
    if args.input:
        if not args.input.is_file():
            raise SeqtrainError(f"--input {args.input}: no such file")
        trees += [t for t, _ in listops.read_file(args.input)]
    for tree, value in zip(trees, classify(model, cfg, trees), strict=True):
        print(f"{tree.text()}\t{value}")
    return 0


def _read_images(args: argparse.Namespace) -> int:
    """Each image file and the text the recognizer reads in it, or its caption."""
    from trainer import checkpoint

    if checkpoint.saved_config(checkpoint.resolve(args.checkpoint)).source is not None:
        return _caption(args)
    if args.attention_png:
        raise SeqtrainError("--attention-png goes with an image captioner; this is a text-line recognizer")
    from trainer.data import textlines
    from trainer.evaluation.inference import load_classifier, read_lines

    model, _ = load_classifier(args.checkpoint, ("images",))
    images = []
    for path in args.image:
        if not path.is_file():
            raise SeqtrainError(f"--image {path}: no such file")
        images.append(textlines.read_image(path))
    for path, text in zip(args.image, read_lines(model, images), strict=True):
        print(f"{path}\t{text}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    """Each image file and its caption; with ``--attention-png``, the attention maps."""
    from trainer.data import scenes
    from trainer.data.tokenizer import EOS
    from trainer.evaluation.attention import attention_png
    from trainer.evaluation.inference import caption_ids, load_captioner

    model, tok, cfg = load_captioner(args.checkpoint)
    src, eos = cfg.model.source, tok.token_to_id(EOS)
    images = [scenes.read_image(p, src.channels, src.size) for p in args.image]
    outs = caption_ids(model, cfg, images, eos, args.beam, args.length_penalty)
    for k, (path, ids) in enumerate(zip(args.image, outs, strict=True), 1):
        print(f"{path}\t{tok.decode(ids)}")
        if args.attention_png:
            out = _numbered(args.attention_png, k, len(args.image), ".png")
            attention_png(model, tok, images[k - 1], ids, eos, out)
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    """Each WAV file and its transcript."""
    from trainer.data import speech
    from trainer.data.tokenizer import EOS
    from trainer.evaluation.inference import load_transcriber, transcribe_ids

    model, tok, cfg = load_transcriber(args.checkpoint)
    sounds = [speech.read_wav(p, cfg.model.source.sample_rate) for p in args.audio]
    outs = transcribe_ids(model, cfg, sounds, tok.token_to_id(EOS), args.beam, args.length_penalty)
    for path, ids in zip(args.audio, outs, strict=True):
        print(f"{path}\t{tok.decode(ids)}")
    return 0


def _speak(args: argparse.Namespace) -> int:
    """Each text said by a synthesizer, written as a 16-bit mono WAV file."""
    from trainer.data import speech
    from trainer.evaluation.inference import load_synthesizer, speak

    if not args.text or args.wav is None:
        raise SeqtrainError("a speech synthesizer needs both --text \"what to say\" and --wav OUT.wav")
    model, tok, cfg = load_synthesizer(args.checkpoint)
    rate = cfg.model.audio.sample_rate
    for k, (text, sound) in enumerate(zip(args.text, speak(model, tok, args.text, args.seed), strict=True), 1):
        out = _numbered(args.wav, k, len(args.text), ".wav")
        speech.write_wav(out, sound, rate)
        print(f"{out}\t{len(sound) / rate:.2f} s\t{text}")
    return 0
