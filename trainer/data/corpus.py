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


def _file_documents(f: CorpusFile, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    suffix = f.path.suffix.lower()
    if suffix == ".jsonl":
        with f.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
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
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(f.path)
        if cfg.text_field not in table.column_names:
            raise DataError(
                f"{f.path}: no {cfg.text_field!r} column (columns: {', '.join(table.column_names)}; "
                "set data.text_field)"
            )
        for i, text in enumerate(table.column(cfg.text_field).to_pylist()):
            yield f"{f.name}:{i}", text or ""
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
        self.files = [] if self.is_hf else list_files(cfg.source)

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

    def documents(self) -> Iterator[tuple[str, str]]:
        """All (name, text) pairs in order, stopping before ``max_bytes`` would be exceeded."""
        if self.is_hf:
            ds = hf_dataset(self.cfg)
            field = self.cfg.text_field
            if ds.column_names is not None and field not in ds.column_names:
                raise DataError(
                    f"data.source={self.cfg.source!r}: no {field!r} column "
                    f"(columns: {', '.join(ds.column_names)}; set data.text_field)"
                )
            stream = ((f"{self.cfg.hf_split}:{i}", row[field] or "") for i, row in enumerate(ds))
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

    def texts(self, split: str) -> Iterator[str]:
        """Texts of one split (``train`` or ``val``), or of every document (``all``)."""
        want_val = split == "val"
        for name, text in self.documents():
            if split == "all" or (name_key(name, "split") < self.cfg.val_fraction) == want_val:
                yield text
