"""Corpus sources: a deterministic stream of documents (name, text), split by a hash of the name.

Sources (``data.source``):
- ``stdlib``: the installed Python standard library's source. Every machine with Python has it,
  it needs no download, and it is real code (as the Linux source was for the classic char-RNN
  demo).
- a file, a folder (every file below it) or a glob: ``.txt`` and other text files are one
  document each; ``.jsonl`` is one document per line (``data.text_field``); ``.parquet`` one per
  row.
- ``hf:NAME``: ``datasets.load_dataset(NAME, data.hf_config, split=data.hf_split,
  data_files=data.hf_data_files, streaming=data.streaming)``: a hub dataset, or a builder such as
  ``hf:json`` / ``hf:parquet`` over local files.

The train/validation split sends a document to validation when a hash of its name falls below
``data.val_fraction``: adding documents never moves existing ones between splits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from trainer.config import DataConfig
from trainer.data import hub
from trainer.errors import DataError

# Generated tables rather than code people write: codec maps and the pydoc topic dump.
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "encodings", "pydoc_data"}


def name_key(name: str, purpose: str) -> float:
    """A uniform number in [0, 1) from a document name, independent for each purpose.

    Selection and the split must use different hashes: with one hash, a size cap that keeps the
    lowest keys would also keep exactly the documents that the split sends to validation.
    """
    return int(hashlib.sha1(f"{purpose}:{name}".encode()).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class CorpusFile:
    """One file on disk; ``name`` is stable across machines (a relative path)."""

    name: str
    path: Path
    size: int
    mtime_ns: int


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stat(name: str, path: Path) -> CorpusFile:
    st = path.stat()
    return CorpusFile(name, path, st.st_size, st.st_mtime_ns)


def _stdlib_files(root: Path) -> list[CorpusFile]:
    """Every ``.py`` file below ``root`` outside ``STDLIB_EXCLUDE``, named by its relative path.
    Excluded folders are pruned, not walked (site-packages can hold more than the stdlib): this
    runs at every start, cache hit or not."""
    out = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_EXCLUDE)
        rel = Path(folder).relative_to(root)
        for n in names:
            if n.endswith(".py"):
                out.append(_stat(str(rel / n), Path(folder, n)))
    return out


def list_files(source: str) -> list[CorpusFile]:
    """The files of a file-based ``source``, in a deterministic order.

    ``stdlib`` is ordered by a hash of each name (so a size cap takes a well-mixed subset);
    user files by name.
    """
    if source == "stdlib":
        files = _stdlib_files(stdlib_root())
        order = lambda f: name_key(f.name, "select")  # noqa: E731
    else:
        p = Path(source).expanduser()
        if p.is_file():
            files = [_stat(p.name, p)]
        elif p.is_dir():
            files = [_stat(str(f.relative_to(p)), f) for f in p.rglob("*") if f.is_file()]
        else:
            matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
            if not matches:
                raise DataError(
                    f"data.source={source!r}: no such file, folder or glob match "
                    "(use 'stdlib' for the embedded corpus, or 'hf:NAME' for a datasets name)"
                )
            files = [_stat(str(m), m) for m in matches if m.is_file()]
        order = lambda f: f.name  # noqa: E731
    files = [f for f in files if f.size > 0]
    if not files:
        raise DataError(f"data.source={source!r}: corpus is empty (no non-empty files)")
    return sorted(files, key=order)


def _decode(raw: bytes, where: str, policy: str) -> str:
    try:
        return raw.decode("utf-8", errors="replace" if policy == "replace" else "strict")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: invalid UTF-8 at byte {e.start} (set data.invalid_utf8=replace to "
            "substitute U+FFFD)"
        ) from None


@dataclass(frozen=True)
class Piece:
    """A share of the corpus one preparation shard reads: ``all`` (the document stream, capped
    by ``data.max_bytes``), a ``file`` (for JSONL, its lines from byte ``start`` up to ``stop``,
    the first being line ``first_line``), or ``rows`` ``start`` to ``stop`` of a ``datasets``
    dataset."""

    kind: str
    file: CorpusFile | None = None
    start: int = 0
    stop: int | None = None
    first_line: int = 1

    @property
    def size(self) -> int:
        """Bytes of the file it reads (0 for rows: planned by count)."""
        if self.file is None:
            return 0
        return (self.file.size if self.stop is None else self.stop) - self.start


def _line_pieces(f: CorpusFile, target: int) -> list[Piece]:
    """A JSONL file cut at line ends every ``target`` bytes or so; one read to count lines, so
    each piece's documents keep their names (``file:line``)."""
    cuts, line, pos, want = [(0, 1)], 1, 0, target
    with f.path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            at = 0
            while want < pos + len(chunk):
                nl = chunk.find(b"\n", max(want - pos, at))
                if nl < 0:
                    break
                line += chunk.count(b"\n", at, nl + 1)
                at = nl + 1
                cuts.append((pos + at, line))
                want = pos + at + target
            line += chunk.count(b"\n", at)
            pos += len(chunk)
    cuts = [c for c in cuts if c[0] < pos] or [(0, 1)]
    stops = [c[0] for c in cuts[1:]] + [None]
    return [Piece("file", f, start, stop, first) for (start, first), stop in zip(cuts, stops, strict=True)]


def _jsonl_documents(f: CorpusFile, cfg: DataConfig, piece: Piece) -> Iterator[tuple[str, str]]:
    with f.path.open("rb") as fh:
        fh.seek(piece.start)
        at = piece.start
        for lineno, raw in enumerate(fh, piece.first_line):
            if piece.stop is not None and at >= piece.stop:
                return
            at += len(raw)
            if not raw.strip():
                continue
            where = f"{f.path}:{lineno}"
            try:
                row = json.loads(_decode(raw, where, cfg.invalid_utf8))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or cfg.text_field not in row:
                raise DataError(f"{where}: no {cfg.text_field!r} field (set data.text_field)")
            yield f"{f.name}:{lineno}", str(row[cfg.text_field])


def _parquet_documents(f: CorpusFile, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Row by row, a record batch at a time: memory stays bounded whatever the file's size."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    if cfg.text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{f.path}: no {cfg.text_field!r} column (columns: {', '.join(pf.schema_arrow.names)}; "
            "set data.text_field)"
        )
    i = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[cfg.text_field]):
        for text in batch.column(0).to_pylist():
            yield f"{f.name}:{i}", text or ""
            i += 1


def _file_documents(f: CorpusFile, cfg: DataConfig, piece: Piece | None = None) -> Iterator[tuple[str, str]]:
    suffix = f.path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(f, cfg, piece or Piece("file", f))
    elif suffix == ".parquet":
        yield from _parquet_documents(f, cfg)
    else:
        yield f.name, _decode(f.path.read_bytes(), str(f.path), cfg.invalid_utf8)


# ``datasets``' builders over local files: no Hub involved.
LOCAL_BUILDERS = {"json", "parquet", "csv", "text", "arrow"}


def hf_dataset(cfg: DataConfig):
    name = cfg.source.removeprefix("hf:")
    # Offline because the Hub did not answer just now (not because the environment asked).
    probed = (name not in LOCAL_BUILDERS and not Path(name).exists() and not hub.offline_requested()
              and hub.offline_unless_reachable())
    import datasets  # after the offline check: it reads the mode when imported

    try:
        return datasets.load_dataset(
            name, cfg.hf_config, split=cfg.hf_split, data_files=cfg.hf_data_files,
            streaming=cfg.streaming,
        )
    except FileNotFoundError as e:
        raise DataError(f"data.source={cfg.source!r}: {e}") from None
    except ConnectionError as e:  # no network, or HF_HUB_OFFLINE with nothing cached
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the Hub ({hub.endpoint()}) did not answer within {hub.TIMEOUT_S:.0f} s and " \
            "the datasets cache does not hold it" if probed else f"cannot reach the dataset ({first})"
        raise DataError(
            f"data.source={cfg.source!r}: {where}; on an offline node, load it once where the Hub is "
            "reachable (then set HF_DATASETS_OFFLINE=1 to read the datasets cache) or point "
            "data.source at local files"
        ) from None


class Corpus:
    """The documents of ``cfg``, capped at ``data.max_bytes``, split into train/validation."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.is_hf = cfg.source.startswith("hf:")
        if not self.is_hf:
            self.files  # noqa: B018  a missing or empty source is refused at once

    @classmethod
    def reader(cls, cfg: DataConfig) -> Corpus:
        """A corpus that reads the units it is given without listing the source first."""
        out = cls.__new__(cls)
        out.cfg, out.is_hf = cfg, cfg.source.startswith("hf:")
        return out

    @cached_property
    def files(self) -> list[CorpusFile]:
        """The source's files (listed once, when first needed: a unit of work names its own)."""
        return [] if self.is_hf else list_files(self.cfg.source)

    def fingerprint(self, extra: str = "") -> str:
        """Changes when the source or the options that shape it change.

        Files: names, sizes and modification times (cheap on a large corpus). ``datasets``:
        the dataset's own fingerprint, or for a stream its name, config, split and files.
        """
        c = self.cfg
        h = hashlib.sha256(f"{extra}|{c.source}|{c.max_bytes}|{c.val_fraction}|{c.text_field}|"
                           f"{c.invalid_utf8}".encode())
        if self.is_hf:
            ident = f"{c.hf_config}|{c.hf_split}|{c.hf_data_files}|{c.streaming}"
            if not c.streaming:
                ident += "|" + hf_dataset(c)._fingerprint
            h.update(ident.encode())
        for f in self.files:
            h.update(f"{f.name}\0{f.size}\0{f.mtime_ns}\n".encode())
        return h.hexdigest()

    def _hf_rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, str]]:
        ds = hf_dataset(self.cfg)
        field = self.cfg.text_field
        if ds.column_names is not None and field not in ds.column_names:
            raise DataError(
                f"data.source={self.cfg.source!r}: no {field!r} column "
                f"(columns: {', '.join(ds.column_names)}; set data.text_field)"
            )
        if stop is None:  # the whole dataset (a stream has no length)
            yield from ((f"{self.cfg.hf_split}:{i}", row[field] or "") for i, row in enumerate(ds))
            return
        for a in range(start, stop, 1024):
            texts = ds[a: min(a + 1024, stop)][field]
            yield from ((f"{self.cfg.hf_split}:{a + j}", t or "") for j, t in enumerate(texts))

    def documents(self) -> Iterator[tuple[str, str]]:
        """All (name, text) pairs in order, stopping before ``max_bytes`` would be exceeded."""
        if self.is_hf:
            stream = self._hf_rows()
        else:
            stream = (d for f in self.files for d in _file_documents(f, self.cfg))
        budget, total = self.cfg.max_bytes, 0
        for name, text in stream:
            if budget is not None:
                size = len(text.encode("utf-8", errors="replace"))
                if total and total + size > budget:
                    return
                total += size
            yield name, text

    def units(self, unit_bytes: int) -> list[tuple[Piece, ...]]:
        """The corpus cut into units of work of about ``unit_bytes`` input bytes, in order:
        whole files (JSONL files larger than a unit cut at line ends), or row ranges of a
        ``datasets`` dataset. One unit, the whole stream, under ``data.max_bytes`` (its cap runs
        across documents in order) or for a streamed dataset (no length)."""
        if self.cfg.max_bytes is not None or (self.is_hf and self.cfg.streaming):
            return [(Piece("all"),)]
        if self.is_hf:
            ds = hf_dataset(self.cfg)
            n, size = ds.num_rows, max(1, ds.data.nbytes)
            rows = max(1, int(n * unit_bytes / size))
            return [(Piece("rows", None, a, min(a + rows, n)),) for a in range(0, n, rows)] or [(Piece("all"),)]
        units, current, held = [], [], 0
        for f in self.files:
            big = f.path.suffix.lower() == ".jsonl" and f.size > unit_bytes
            for piece in _line_pieces(f, unit_bytes) if big else [Piece("file", f)]:
                current.append(piece)
                held += piece.size
                if held >= unit_bytes:
                    units.append(tuple(current))
                    current, held = [], 0
        return units + [tuple(current)] if current else units

    def unit_documents(self, unit: tuple[Piece, ...]) -> Iterator[tuple[str, str]]:
        """The (name, text) pairs of one unit, in corpus order."""
        for piece in unit:
            if piece.kind == "all":
                yield from self.documents()
            elif piece.kind == "rows":
                yield from self._hf_rows(piece.start, piece.stop)
            else:
                yield from _file_documents(piece.file, self.cfg, piece)

    def texts(self, split: str) -> Iterator[str]:
        """Texts of one split (``train`` or ``val``), or of every document (``all``)."""
        want_val = split == "val"
        for name, text in self.documents():
            if split == "all" or (name_key(name, "split") < self.cfg.val_fraction) == want_val:
                yield text
