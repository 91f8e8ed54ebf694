"""Tokenizers (HF ``tokenizers``): byte-level BPE trained on the corpus, or a file given."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.errors import DataError

EOS = "<|endoftext|>"
"""Separates packed documents; also the BOS of generation prompts."""
PAD = "<|pad|>"
"""Padding for batched sequence-to-sequence data."""
UNK = "<|unk|>"
"""Characters outside a character-level vocabulary (byte-level BPE has no unknowns)."""
SPECIAL_TOKENS = (EOS, PAD)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so any text encodes without unknowns."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_char(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """One token per character: the ``vocab_size - 3`` most frequent ones, the rest ``UNK``."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    specials = [*SPECIAL_TOKENS, UNK]
    # Ties broken by the character itself, so the vocabulary is deterministic.
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(specials)]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters, no separators
    return tok


def sample(texts: Iterable[str], budget: int) -> Iterator[str]:
    """The texts in order up to ``budget`` UTF-8 bytes (the last one cut to fit): what a
    tokenizer trains on, bounded whatever the corpus's size."""
    left = budget
    for text in texts:
        if left <= 0:
            return
        raw = text.encode("utf-8", errors="replace")
        if len(raw) > left:
            text = raw[:left].decode("utf-8", errors="ignore")
        left -= len(raw)
        yield text


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    return train_char(texts, vocab_size) if kind == "char" else train_bpe(texts, vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"data.tokenizer.path={str(path)!r}: no tokenizer.json there")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exception on a malformed file
        raise DataError(f"data.tokenizer.path={str(p)!r}: not a valid tokenizer.json ({e})") from None
    if tok.token_to_id(EOS) is None:
        raise DataError(f"{p}: tokenizer has no {EOS!r} token (needed to separate documents)")
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def cached_tokenizer(kind: str, vocab_size: int, texts: list[str], root: Path,
                     log: Callable[[str], None] = print) -> Path:
    """A tokenizer trained on ``texts`` (captions, transcripts), cached under ``root`` by their
    hash: the file's path. Written to a temporary name and renamed: a reader never sees half."""
    h = hashlib.sha256(f"{kind}|{vocab_size}|".encode())
    h.update("\n".join(texts).encode())
    path = root / h.hexdigest()[:20] / "tokenizer.json"  # the name a run directory reads
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        train_tokenizer(kind, texts, vocab_size).save(str(tmp))
        os.replace(tmp, path)
        log(f"trained a tokenizer on {len(texts):,} texts -> {path}")
    return path
