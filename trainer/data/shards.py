"""Packed token shards: one ``.bin`` memmap per split plus ``meta.json``, cached by fingerprint.

A dataset directory holds ``tokenizer.json``, ``train.bin``, ``val.bin`` and ``meta.json``. It is
built under a temporary name and renamed into place, so a killed prepare never leaves a
directory that looks complete; ``meta.json`` existing means the shards are whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from trainer.config import DataConfig
from trainer.data import corpus
from trainer.data.tokenizer import EOS, load_tokenizer, tokenizer_hash, train_bpe

FORMAT_VERSION = 1


@dataclass
class PreparedData:
    """Where a prepared dataset lives and what it holds."""

    dir: Path
    meta: dict

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))

    def split_path(self, split: str) -> Path:
        return self.dir / f"{split}.bin"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache of uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _dataset_key(cfg: DataConfig, files: list[corpus.CorpusFile]) -> str:
    tok = cfg.tokenizer
    tok_spec = (
        f"file:{tokenizer_hash(load_tokenizer(tok.path))}" if tok.path else f"{tok.kind}:{tok.vocab_size}"
    )
    spec = f"v{FORMAT_VERSION}|{cfg.source}|{cfg.max_bytes}|{cfg.val_fraction}|{tok_spec}"
    return corpus.fingerprint(files, spec)


def _write_split(tok: Tokenizer, files: list[corpus.CorpusFile], path: Path, dtype: np.dtype) -> int:
    """Tokenize documents in batches (Rust threads in ``encode_batch``), EOS after each."""
    eos = tok.token_to_id(EOS)
    n = 0
    batch: list[str] = []
    with open(path, "wb") as out:

        def flush() -> int:
            encs = tok.encode_batch(batch, add_special_tokens=False)
            ids = np.fromiter(
                (i for e in encs for i in (*e.ids, eos)), dtype=dtype, count=sum(len(e.ids) + 1 for e in encs)
            )
            ids.tofile(out)
            batch.clear()
            return len(ids)

        for text in corpus.read_texts(files):
            batch.append(text)
            if len(batch) >= 64:
                n += flush()
        if batch:
            n += flush()
    return n


def prepare(cfg: DataConfig, log=print) -> PreparedData:
    """Return the prepared dataset for ``cfg``, building it if no complete cache exists."""
    files = corpus.select(corpus.list_files(cfg.source), cfg.max_bytes)
    key = _dataset_key(cfg, files)
    root = cfg.resolved_cache_dir() / "datasets"
    final = root / key[:20]
    if (final / "meta.json").is_file():
        return PreparedData(final, json.loads((final / "meta.json").read_text()))

    splits = corpus.split(files, cfg.val_fraction)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:20]}-", dir=root))
    try:
        t0 = time.perf_counter()
        if cfg.tokenizer.path:
            tok = load_tokenizer(cfg.tokenizer.path)
        else:
            log(f"training a {cfg.tokenizer.vocab_size}-token byte-level BPE on {len(splits['train'])} files")
            tok = train_bpe(corpus.read_texts(splits["train"]), cfg.tokenizer.vocab_size)
        t_tok = time.perf_counter() - t0
        tok.save(str(tmp / "tokenizer.json"))
        dtype = token_dtype(tok.get_vocab_size())
        meta: dict = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "fingerprint": key,
            "tokenizer_sha256": tokenizer_hash(tok),
            "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.token_to_id(EOS),
            "dtype": dtype.name,
            "splits": {},
        }
        t1 = time.perf_counter()
        for name, split_files in splits.items():
            n = _write_split(tok, split_files, tmp / f"{name}.bin", dtype)
            meta["splits"][name] = {
                "documents": len(split_files),
                "bytes": sum(f.size for f in split_files),
                "tokens": n,
            }
        t_enc = time.perf_counter() - t1
        meta["seconds"] = {"tokenizer": round(t_tok, 3), "encode": round(t_enc, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (another node on a shared disk) finished first: keep its copy.
            if not (final / "meta.json").is_file():
                raise
        total = sum(s["bytes"] for s in meta["splits"].values())
        log(
            f"prepared {total / 1e6:.1f} MB -> {sum(s['tokens'] for s in meta['splits'].values()):,} "
            f"tokens in {t_tok + t_enc:.1f}s ({final})"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(final, json.loads((final / "meta.json").read_text()))
