"""Corpus sources: documents (name, text) split deterministically into train and validation.

The embedded default is the installed Python standard library's source: every machine with
Python has it, it needs no download, and it is real code (as the Linux source was for the
classic char-RNN demo).
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import DataError


@dataclass(frozen=True)
class CorpusFile:
    """One document on disk; ``name`` is stable across machines (relative path)."""

    name: str
    path: Path
    size: int
    mtime_ns: int

    def key(self, purpose: str) -> float:
        """A uniform number in [0, 1) from the name, independent for each purpose.

        Selection and the split must use different hashes: with one hash, a size cap that keeps
        the lowest keys would also keep exactly the files that the split sends to validation.
        """
        return int(hashlib.sha1(f"{purpose}:{self.name}".encode()).hexdigest()[:8], 16) / 2**32


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stat(name: str, path: Path) -> CorpusFile:
    st = path.stat()
    return CorpusFile(name, path, st.st_size, st.st_mtime_ns)


# Generated tables rather than code people write: codec maps and the pydoc topic dump.
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "encodings", "pydoc_data"}


def list_files(source: str) -> list[CorpusFile]:
    """The documents of ``source``: ``stdlib``, a file, a folder (all files below) or a glob."""
    if source == "stdlib":
        root = stdlib_root()
        files = [
            _stat(str(p.relative_to(root)), p)
            for p in root.rglob("*.py")
            if not STDLIB_EXCLUDE & set(p.relative_to(root).parts)
        ]
    else:
        p = Path(source).expanduser()
        if p.is_file():
            files = [_stat(p.name, p)]
        elif p.is_dir():
            files = [_stat(str(f.relative_to(p)), f) for f in p.rglob("*") if f.is_file()]
        else:
            matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
            files = [_stat(str(m), m) for m in matches if m.is_file()]
            if not matches:
                raise DataError(
                    f"data.source={source!r}: no such file, folder or glob match "
                    "(use 'stdlib' for the embedded corpus)"
                )
    files = [f for f in files if f.size > 0]
    if not files:
        raise DataError(f"data.source={source!r}: corpus is empty (no non-empty files)")
    return sorted(files, key=lambda f: f.name)


def select(files: list[CorpusFile], max_bytes: int | None) -> list[CorpusFile]:
    """Whole files in hash order until ``max_bytes``: a deterministic, well-mixed subset."""
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for f in sorted(files, key=lambda f: f.key("select")):
        if total and total + f.size > max_bytes:
            continue
        chosen.append(f)
        total += f.size
    return sorted(chosen, key=lambda f: f.name)


def split(files: list[CorpusFile], val_fraction: float) -> dict[str, list[CorpusFile]]:
    """Train/validation by a hash of each name, so adding files never moves existing ones.

    At least one document goes to validation (the smallest-key one) and one to train.
    """
    val = [f for f in files if f.key("split") < val_fraction]
    if not val and len(files) > 1:
        val = [min(files, key=lambda f: f.key("split"))]
    train = [f for f in files if f not in val]
    if not train or not val:
        raise DataError(
            f"corpus has {len(files)} document(s): need at least 2 to split train/validation"
        )
    return {"train": train, "val": val}


def fingerprint(files: list[CorpusFile], extra: str = "") -> str:
    """Hash of names, sizes and modification times (not contents: cheap on a large corpus)."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update(f"{f.name}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def read_texts(files: list[CorpusFile]) -> Iterator[str]:
    for f in files:
        # Invalid UTF-8 becomes U+FFFD rather than stopping a long prepare on one bad byte.
        yield f.path.read_text(encoding="utf-8", errors="replace")
