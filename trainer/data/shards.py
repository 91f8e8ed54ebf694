"""Packed token shards: one ``.bin`` memmap per split plus ``meta.json``, cached by fingerprint.

A dataset directory holds ``tokenizer.json``, ``train.bin``, ``val.bin`` and ``meta.json``. Text
is prepared in units of work (``Corpus.units``: whole files, large JSONL files cut at line ends,
row ranges of a ``datasets`` dataset; ``data.shard_bytes`` each) under ``.KEY.partial/``: the
tokenizer first (trained on a bounded sample), then each unit's ``train-NNNNN.bin`` and
``val-NNNNN.bin`` with ``NNNNN.json`` renamed into place last, so a unit is whole or absent. A
killed preparation resumes at the first missing unit; ``workers`` processes and ``part`` i/n
(nodes, a Slurm array) share the units; whoever finds every unit written concatenates them in
order (the tokens never depend on the split of the work) into a temporary directory renamed
into place: ``meta.json`` existing means the shards are whole. Memory stays bounded by a unit's
largest document and an encode batch, whatever the corpus's size.
"""

from __future__ import annotations

import functools
import gc
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from trainer.config import DataConfig
from trainer.data import pretokenized
from trainer.data.corpus import Corpus, Piece, name_key
from trainer.data.tokenizer import EOS, load_tokenizer, sample, tokenizer_hash, train_tokenizer
from trainer.errors import DataError

FORMAT_VERSION = 2
ENCODE_BATCH = 256  # documents per encode_batch call (tokenizers spreads them over threads)


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


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written cache directory into place (``meta.json`` last inside it)."""
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process (another node on a shared disk) finished first: keep its copy.
        if not (final / "meta.json").is_file():
            raise


def writer_tag() -> str:
    """Names this process's temporary files apart from every other writer's, on any node of a
    shared file system."""
    return f"{socket.gethostname()}-{os.getpid()}"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache of uint32)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _tokenizer_spec(cfg: DataConfig) -> str:
    tok = cfg.tokenizer
    if tok.path:
        return f"file:{tokenizer_hash(load_tokenizer(tok.path))}"
    return f"{tok.kind}:{tok.vocab_size}:{tok.train_bytes}"


def encode_documents(tok: Tokenizer, docs: Iterable[tuple[str, str]], outs: dict[str, Path],
                     dtype: np.dtype, val_fraction: float) -> dict[str, dict[str, int]]:
    """Append each document's ids and an EOS to its split's file (validation when a hash of its
    name is below ``val_fraction``); returns tokens and bytes per split.

    ``encode_batch`` runs on all cores in tokenizers' Rust thread pool (one thread per worker
    process when there are several).
    """
    eos = tok.token_to_id(EOS)
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets we never use: ~15 % faster.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    counts = {split: {"bytes": 0, "tokens": 0} for split in outs}
    files = {split: open(path, "wb") for split, path in outs.items()}  # noqa: SIM115  closed below
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        encs = encode([text for _, text in batch], add_special_tokens=False)
        ids: dict[str, list[int]] = {split: [] for split in outs}
        for (name, text), e in zip(batch, encs, strict=True):
            split = "val" if name_key(name, "split") < val_fraction else "train"
            ids[split] += e.ids
            ids[split].append(eos)
            counts[split]["bytes"] += len(text.encode("utf-8", errors="replace"))
        for split, got in ids.items():  # one array per split and batch, not one per document
            np.array(got, dtype=dtype).tofile(files[split])
            counts[split]["tokens"] += len(got)
        batch.clear()

    try:
        for doc in docs:
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                flush()
        if batch:
            flush()
    finally:
        for f in files.values():
            f.close()
    return counts


def _pack_token_ids(cfg: DataConfig, key: str, tmp: Path, log: Callable[[str], None]) -> None:
    """A pre-tokenized source (``pretokenized.py``) into ``tmp``: its splits' ids in our dtype,
    the given tokenizer beside them, ``meta.json`` last."""
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.tokenizer.path)
    tok.save(str(tmp / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    meta = {**_meta(cfg, key, tok, dtype), "pretokenized": pretokenized.kind(cfg)}
    for split, chunks in pretokenized.splits(cfg, vocab, tok.token_to_id(EOS)).items():
        n = 0
        with open(tmp / f"{split}.bin", "wb") as out:
            for chunk in chunks:
                chunk.astype(dtype).tofile(out)
                n += len(chunk)
        meta["splits"][split] = {"bytes": n * dtype.itemsize, "tokens": n}
    _complete_splits(cfg, meta, tmp, dtype, "token ids")
    meta["seconds"] = {"tokenizer": 0.0, "encode": round(time.perf_counter() - t0, 3)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    n_tokens = sum(s["tokens"] for s in meta["splits"].values())
    log(f"read {n_tokens:,} token ids ({meta['pretokenized']}) from {cfg.source} -> {dtype.name} shards")


def _meta(cfg: DataConfig, key: str, tok: Tokenizer, dtype: np.dtype) -> dict:
    """``meta.json``'s fields before the splits are written."""
    return {"format": FORMAT_VERSION, "source": cfg.source, "fingerprint": key,
            "tokenizer_sha256": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.token_to_id(EOS), "dtype": dtype.name, "splits": {}}


def _complete_splits(cfg: DataConfig, meta: dict, d: Path, dtype: np.dtype, what: str) -> None:
    """Refuse an empty training split; without a validation split, hold out the tail."""
    if meta["splits"]["train"]["tokens"] == 0:
        raise DataError(f"data.source={cfg.source!r}: no {what} to train on")
    if meta["splits"].get("val", {}).get("tokens", 0) == 0:
        meta["splits"] = _hold_out_tail(d, dtype, cfg.val_fraction, meta["splits"]["train"])
        meta["val_from_train_tail"] = True


def _hold_out_tail(d: Path, dtype: np.dtype, fraction: float, train: dict) -> dict:
    """The last ``fraction`` of the train tokens moved to ``val.bin``: copied in chunks and cut
    off by truncation, never read whole."""
    n = train["tokens"]
    n_val = max(1, int(n * fraction))
    cut = (n - n_val) * dtype.itemsize
    with open(d / "train.bin", "rb") as src, open(d / "val.bin", "wb") as dst:
        src.seek(cut)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.truncate(d / "train.bin", cut)
    val_bytes = int(train["bytes"] * n_val / n)
    return {
        "train": {"bytes": train["bytes"] - val_bytes, "tokens": n - n_val},
        "val": {"bytes": val_bytes, "tokens": n_val},
    }


def parse_part(text: str) -> tuple[int, int]:
    """``i/n`` (0 <= i < n) of ``--part``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise DataError(f"--part {text!r}: give i/n with 0 <= i < n (e.g. 0/4 ... 3/4, or "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return i, n


def prepare(cfg: DataConfig, log: Callable[[str], None] = print, workers: int = 1,
            part: tuple[int, int] | None = None) -> PreparedData | None:
    """Return the prepared dataset for ``cfg``, building it if no complete cache exists: the
    units of ``part`` (i, n) only, or all, with ``workers`` processes. None when ``part`` is
    done but another part's units are still missing."""
    tokens = pretokenized.kind(cfg)
    if tokens and not cfg.tokenizer.path:
        raise DataError(f"data.source={cfg.source!r} holds token ids ({tokens}): set data.tokenizer.path "
                        "to the tokenizer.json that made them")
    corpus = None if tokens else Corpus(cfg)
    extra = f"v{FORMAT_VERSION}|{_tokenizer_spec(cfg)}"
    key = pretokenized.fingerprint(cfg, extra) if tokens else corpus.fingerprint(extra)
    root = cfg.resolved_cache_dir() / "datasets"
    final = root / key[:20]
    if (final / "meta.json").is_file():
        return PreparedData(final, json.loads((final / "meta.json").read_text()))
    root.mkdir(parents=True, exist_ok=True)
    if tokens:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:20]}-", dir=root))
        try:
            _pack_token_ids(cfg, key, tmp, log)
            publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return PreparedData(final, json.loads((final / "meta.json").read_text()))

    work = root / f".{key[:20]}.partial"
    work.mkdir(exist_ok=True)
    try:
        return _prepare_text(cfg, corpus, key, work, final, log, workers, part)
    except Exception as e:
        # Several preparations of one corpus may run at once (a node's first rank each, the
        # tasks of an array): whoever publishes first removes the shared work directory under
        # the others' feet. Their copy would be the same: take it.
        if (final / "meta.json").is_file():
            shutil.rmtree(work, ignore_errors=True)  # in case this process made it again, late
            return PreparedData(final, json.loads((final / "meta.json").read_text()))
        if isinstance(e, DataError):  # bad input: fixing it changes the fingerprint
            shutil.rmtree(work, ignore_errors=True)
        raise


def _prepare_text(cfg: DataConfig, corpus: Corpus, key: str, work: Path, final: Path, log: Callable[[str], None],
                  workers: int, part: tuple[int, int] | None) -> PreparedData | None:
    t0 = time.perf_counter()
    tok = _work_tokenizer(cfg, corpus, work, log)
    t_tok = time.perf_counter() - t0
    units = corpus.units(cfg.shard_bytes)
    mine = [u for u in range(len(units)) if part is None or u % part[1] == part[0]]
    todo = [u for u in mine if not _unit_meta(work, u).is_file()]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards of {cfg.source} already written")
    t1 = time.perf_counter()
    _encode_units(cfg, work, [(u, units[u]) for u in todo], workers)
    t_enc = time.perf_counter() - t1
    if (final / "meta.json").is_file():  # another part (or preparation) finished the set meanwhile
        shutil.rmtree(work, ignore_errors=True)
        return PreparedData(final, json.loads((final / "meta.json").read_text()))
    missing = [u for u in range(len(units)) if not _unit_meta(work, u).is_file()]
    if missing:
        log(f"{cfg.source}: part {part[0]}/{part[1]} wrote its {len(mine)} shards; {len(missing)} of "
            f"{len(units)} are still to come from the other parts, the last of which writes the dataset")
        return None
    prep = _finalize(cfg, key, tok, work, len(units), final, {"tokenizer": t_tok, "encode": t_enc}, log)
    shutil.rmtree(work, ignore_errors=True)
    return prep


def _unit_meta(work: Path, u: int) -> Path:
    return work / f"{u:05d}.json"


def _work_tokenizer(cfg: DataConfig, corpus: Corpus, work: Path, log: Callable[[str], None]) -> Tokenizer:
    """The given tokenizer, or the one trained for this preparation (kept in ``work``, so a
    resumed or parallel preparation encodes with the same one)."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    path = work / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    log(f"training a {cfg.tokenizer.vocab_size}-token {cfg.tokenizer.kind} tokenizer on {cfg.source}")
    # Too few documents for a document-level split (one text file, or every document hashing
    # to validation): learn from everything, as it will all train.
    split = "train" if next(corpus.texts("train"), None) is not None else "all"
    tok = train_tokenizer(cfg.tokenizer.kind, sample(corpus.texts(split), cfg.tokenizer.train_bytes),
                          cfg.tokenizer.vocab_size)
    tmp = work / f"tokenizer.json.{writer_tag()}"
    tok.save(str(tmp))
    tmp.replace(path)  # concurrent parts train the same one: whoever renames last wins, equal
    return tok


def _unit_tokenizer(path: str) -> Tokenizer:
    """One tokenizer per process for all its units: a fresh one per unit, used and dropped,
    leaves a few MB behind each time (measured), which adds up over thousands of units."""
    st = Path(path).stat()
    return _load_once(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _load_once(path: str, mtime_ns: int, size: int) -> Tokenizer:
    return load_tokenizer(path)


def encode_unit(cfg: DataConfig, work: Path, u: int, unit: tuple[Piece, ...]) -> dict:
    """Unit ``u`` into ``train-u.bin`` and ``val-u.bin``, then ``u.json`` with their counts:
    each renamed into place when whole, the counts last."""
    tok = _unit_tokenizer(str(work / "tokenizer.json") if not cfg.tokenizer.path else cfg.tokenizer.path)
    dtype = token_dtype(tok.get_vocab_size())
    tag = f"{writer_tag()}.tmp"
    outs = {split: work / f"{split}-{u:05d}.bin.{tag}" for split in ("train", "val")}
    t0 = time.perf_counter()
    counts = encode_documents(tok, Corpus.reader(cfg).unit_documents(unit), outs, dtype, cfg.val_fraction)
    for split, path in outs.items():
        path.replace(work / f"{split}-{u:05d}.bin")
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    meta = _unit_meta(work, u)
    meta.with_suffix(f".{tag}").write_text(json.dumps(counts))
    meta.with_suffix(f".{tag}").replace(meta)
    return counts


def _encode_units(cfg: DataConfig, work: Path, todo: list[tuple[int, tuple[Piece, ...]]], workers: int) -> None:
    bar = tqdm(total=len(todo), unit="shard", desc=f"tokenize {cfg.source}", disable=None, file=sys.stderr,
               leave=False)
    with bar:
        if workers <= 1 or len(todo) <= 1:
            for u, unit in todo:
                encode_unit(cfg, work, u, unit)
                bar.update()
            return
        # Forked workers share the parent's imports (torch alone is ~200 MB) page for page, so
        # memory grows by an encode batch per worker, not by an interpreter. Each encodes on one
        # thread (the processes are the parallelism): tokenizers' thread pool is off in them,
        # said before the fork so that tokenizers need not warn about it.
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # The parent's objects out of the collector's reach: a child's collections would write
        # to their headers and copy the pages they sit on, one by one, over its life.
        gc.freeze()
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                for _ in pool.map(encode_unit, *zip(*((cfg, work, u, unit) for u, unit in todo), strict=True)):
                    bar.update()
        finally:
            gc.unfreeze()
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before


def _concatenate(paths: Iterator[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)


def _finalize(cfg: DataConfig, key: str, tok: Tokenizer, work: Path, n_units: int, final: Path,
              seconds: dict[str, float], log: Callable[[str], None]) -> PreparedData:
    """Every unit's shards, in order, into a temporary directory renamed into place."""
    counts = [json.loads(_unit_meta(work, u).read_text()) for u in range(n_units)]
    dtype = token_dtype(tok.get_vocab_size())
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:20]}-", dir=final.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        meta = _meta(cfg, key, tok, dtype)
        total = {split: {k: sum(c[split][k] for c in counts) for k in ("bytes", "tokens")} for split in ("train", "val")}
        if total["train"]["tokens"]:
            for split in ("train", "val"):
                _concatenate((work / f"{split}-{u:05d}.bin" for u in range(n_units)), tmp / f"{split}.bin")
            meta["splits"] = total
        else:  # no document hashed to training: they all train, and the tail validates
            _concatenate((work / f"val-{u:05d}.bin" for u in range(n_units)), tmp / "train.bin")
            meta["splits"] = {"train": total["val"], "val": {"bytes": 0, "tokens": 0}}
        _complete_splits(cfg, meta, tmp, dtype, "text")
        size = sum(s["bytes"] for s in meta["splits"].values())
        meta["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        meta["encode_mb_per_s"] = round(size / 1e6 / max(sum(c["seconds"] for c in counts), 1e-9), 2)
        meta["shards"] = n_units
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "meta.json").read_text())
    n_tokens = sum(s["tokens"] for s in meta["splits"].values())
    log(f"prepared {size / 1e6:.1f} MB -> {n_tokens:,} tokens ({dtype.name}) in {n_units} shards; tokenizer "
        f"{seconds['tokenizer']:.1f}s, encoding {seconds['encode']:.1f}s ({meta['encode_mb_per_s']} MB/s per "
        f"process) ({final})")
    return PreparedData(final, meta)
