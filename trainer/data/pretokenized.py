"""Corpora another tool already tokenized (``data.source``), read as arrays of ids per split for
``shards.prepare`` to pack as it packs the text it tokenizes itself.

- **nanoGPT**: a folder holding ``train.bin`` (and ``val.bin``): flat ids, uint16 as nanoGPT's
  ``prepare.py`` writes them, or uint32 where the tokenizer's vocabulary passes 65,536. Without
  ``val.bin`` the tail of ``train.bin`` validates (``data.val_fraction``).
- **Megatron-LM / GPT-NeoX indexed datasets** (their ``preprocess_data.py``): ``PREFIX.bin`` with
  ``PREFIX.idx``, named by the prefix or either file. The index (``MMIDIDX``, version 1): a dtype
  code, the sequence count and the document count, each sequence's length (int32) and byte
  offset (int64), then the documents' sequence boundaries (int64). Documents go to validation by
  a hash of their index, as text documents do by their name; their ids are kept as written (an
  end-of-document token where the tool appended one).
- **A ``datasets`` dataset with an ``input_ids`` column** (``hf:NAME``, or ``hf:parquet`` /
  ``hf:json`` over local files) and no text column (``data.text_field``), as
  ``dataset.map(tokenizer)`` leaves it: one document per row, split by a hash of its row name as
  text rows are; the end-of-text id is appended to a row that does not end with it.

The tokenizer that made the ids is ``data.tokenizer.path`` (required: ids mean nothing without
it). Every id is checked against its vocabulary; the arrays are read in bounded chunks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer.config import DataConfig
from trainer.data.corpus import hf_dataset, name_key
from trainer.errors import DataError

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""The index's dtype codes (6 and 7 are floats: never token ids)."""
CHUNK = 1 << 22
"""Ids read at a time: memory stays bounded whatever the corpus's size."""


IDS_COLUMN = "input_ids"


def kind(cfg: DataConfig) -> str | None:
    """``"nanogpt"``, ``"megatron"``, ``"datasets-input-ids"``, or None for a source of text."""
    if cfg.source.startswith("hf:"):
        columns = hf_dataset(cfg).column_names or []
        return "datasets-input-ids" if IDS_COLUMN in columns and cfg.text_field not in columns else None
    p = Path(cfg.source).expanduser()
    if p.is_dir() and (p / "train.bin").is_file():
        return "nanogpt"
    prefix = _prefix(p)
    if prefix.with_name(prefix.name + ".idx").is_file() and prefix.with_name(prefix.name + ".bin").is_file():
        return "megatron"
    return None


def _prefix(p: Path) -> Path:
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


def files(cfg: DataConfig) -> list[Path]:
    p = Path(cfg.source).expanduser()
    if kind(cfg) == "nanogpt":
        return [f for f in (p / "train.bin", p / "val.bin") if f.is_file()]
    prefix = _prefix(p)
    return [prefix.with_name(prefix.name + ext) for ext in (".idx", ".bin")]


def fingerprint(cfg: DataConfig, extra: str) -> str:
    """Changes when a file (name, size, modification time) or the split's options change."""
    h = hashlib.sha256(f"{extra}|tokens|{cfg.source}|{cfg.val_fraction}".encode())
    if cfg.source.startswith("hf:"):
        ident = f"{cfg.hf_config}|{cfg.hf_split}|{cfg.hf_data_files}|{cfg.streaming}|{cfg.max_bytes}"
        h.update((ident + ("" if cfg.streaming else "|" + hf_dataset(cfg)._fingerprint)).encode())
        return h.hexdigest()
    for f in files(cfg):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def splits(cfg: DataConfig, vocab_size: int, eos: int) -> dict[str, Iterator[np.ndarray]]:
    """Per split (``train``, and ``val`` where the source has one), the ids in order, in
    chunks, each checked to be below ``vocab_size``."""
    source = kind(cfg)
    if source == "datasets-input-ids":
        where = f"data.source={cfg.source!r} column {IDS_COLUMN!r}"
        return {split: _checked(_in_chunks(_rows(cfg, split, eos)), where, vocab_size) for split in ("train", "val")}
    if source == "nanogpt":
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        return {f.stem: _checked(_flat(f, dtype), f, vocab_size) for f in files(cfg)}
    idx, data = files(cfg)
    out = {}
    for split in ("train", "val"):
        out[split] = _checked(_in_chunks(_megatron_documents(idx, data, cfg.val_fraction, split)), data, vocab_size)
    return out


def _flat(path: Path, dtype) -> Iterator[np.ndarray]:
    size = np.dtype(dtype).itemsize
    if path.stat().st_size % size:
        raise DataError(f"{path}: {path.stat().st_size} bytes is not a whole number of {np.dtype(dtype).name} ids")
    ids = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    for start in range(0, len(ids), CHUNK):
        yield np.asarray(ids[start:start + CHUNK])


def _in_chunks(arrays: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Consecutive arrays joined into chunks of at least ``CHUNK`` ids (the last may be less)."""
    buf: list[np.ndarray] = []
    held = 0
    for a in arrays:
        buf.append(a)
        held += len(a)
        if held >= CHUNK:
            yield np.concatenate(buf)
            buf, held = [], 0
    if buf:
        yield np.concatenate(buf)


def _rows(cfg: DataConfig, split: str, eos: int) -> Iterator[np.ndarray]:
    """One split's rows (named ``SPLIT:i`` as text rows are), each closed by ``eos``."""
    want_val = split == "val"
    for i, row in enumerate(hf_dataset(cfg)):
        if (name_key(f"{cfg.hf_split}:{i}", "split") < cfg.val_fraction) != want_val:
            continue
        ids = np.asarray(row[IDS_COLUMN], dtype=np.int64)
        if ids.ndim != 1:
            raise DataError(f"data.source={cfg.source!r} row {i}: {IDS_COLUMN!r} is not a list of token ids")
        yield ids if len(ids) and ids[-1] == eos else np.append(ids, eos)


def _checked(chunks: Iterator[np.ndarray], path: Path | str, vocab_size: int) -> Iterator[np.ndarray]:
    seen = 0
    for chunk in chunks:
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size)) if len(chunk) else []
        if len(bad):
            raise DataError(f"{path}: token id {int(chunk[bad[0]])} at position {seen + int(bad[0])} is outside "
                            f"the vocabulary of data.tokenizer.path ({vocab_size} ids); is it the tokenizer "
                            "that made these ids?")
        seen += len(chunk)
        yield chunk


def read_megatron_index(idx: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, byte offsets, document boundaries) of an ``.idx`` file."""
    raw = idx.read_bytes()
    head = len(MEGATRON_MAGIC) + 8 + 1 + 8 + 8
    if len(raw) < head or not raw.startswith(MEGATRON_MAGIC):
        raise DataError(f"{idx}: not a Megatron indexed dataset index (no {MEGATRON_MAGIC!r} header)")
    at = len(MEGATRON_MAGIC)
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, at)
    if version != 1:
        raise DataError(f"{idx}: index version {version}; version 1 is read")
    if code not in MEGATRON_DTYPES:
        raise DataError(f"{idx}: dtype code {code} is not an integer id type (valid: "
                        f"{', '.join(f'{c} {np.dtype(t).name}' for c, t in MEGATRON_DTYPES.items())})")
    at = head
    need = at + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) < need:
        raise DataError(f"{idx}: {len(raw)} bytes, fewer than its {n_seq} sequences and {n_doc} documents need ({need})")
    lengths = np.frombuffer(raw, np.int32, n_seq, at)
    pointers = np.frombuffer(raw, np.int64, n_seq, at + 4 * n_seq)
    docs = np.frombuffer(raw, np.int64, n_doc, at + 12 * n_seq)
    return np.dtype(MEGATRON_DTYPES[code]), lengths, pointers, docs


def _megatron_documents(idx: Path, data: Path, val_fraction: float, split: str) -> Iterator[np.ndarray]:
    """One split's sequences, document by document (a document to validation by a hash of its
    index)."""
    dtype, lengths, pointers, docs = read_megatron_index(idx)
    ids = np.memmap(data, dtype=np.uint8, mode="r")
    for d in range(len(docs) - 1):
        if (name_key(str(d), "split") < val_fraction) != (split == "val"):
            continue
        for s in range(int(docs[d]), int(docs[d + 1])):
            start, n = int(pointers[s]), int(lengths[s]) * dtype.itemsize
            if start + n > len(ids):
                raise DataError(f"{data}: sequence {s} ends at byte {start + n}, past the file's {len(ids)}")
            yield np.frombuffer(ids[start:start + n], dtype=dtype)
