"""The embedded translation corpus: English ► German messages of the installed programs.

Every Debian-like system carries GNU gettext catalogues, ``/usr/share/locale/de/LC_MESSAGES/*.mo``:
the English user messages of its programs (``msgid``) with their German translations
(``msgstr``), tens of thousands of real, human-translated pairs with no download. Read with the
standard library's ``gettext``; whitespace runs (multi-line help texts) become single spaces so
that every pair is one line; untranslated entries (German = English), plurals and duplicates of
an English message (the first catalogue in name order wins) are dropped.

The split is by a hash of the English text, like the language-model corpus splits by document
name: ``val_fraction`` of the messages go to validation, the next ``val_fraction`` to test, the
rest to training, on every machine that has the same catalogues.
"""

from __future__ import annotations

import gettext
import re
from pathlib import Path

from trainer.data.corpus import name_key
from trainer.errors import DataError

NAME = "system-messages"
CATALOGUES = Path("/usr/share/locale/de/LC_MESSAGES")
MAX_CHARS = 400
"""Longer messages (whole manual sections) are left out: no sequence length would hold them."""

_SPACE = re.compile(r"\s+")


def _catalogue(path: Path) -> dict:
    with path.open("rb") as f:
        try:
            return gettext.GNUTranslations(f)._catalog  # the parsed msgid ► msgstr table
        except (OSError, UnicodeDecodeError):  # a catalogue whose header lies about its charset
            return {}


def pairs(root: Path = CATALOGUES) -> list[tuple[str, str]]:
    """(English, German) pairs of every catalogue under ``root``, in a stable order."""
    files = sorted(root.glob("*.mo"))
    if not files:
        raise DataError(f"data.source={NAME}: no gettext catalogues in {root} (install a few "
                        "packages with German messages, or give .tsv pairs)")
    seen: set[str] = set()
    out = []
    for f in files:
        for msgid, msgstr in sorted(_catalogue(f).items(), key=lambda kv: str(kv[0])):
            if not isinstance(msgid, str) or not msgid or not isinstance(msgstr, str):
                continue  # plural forms are keyed (msgid, n); "" is the header
            en = _SPACE.sub(" ", msgid.split("\x04")[-1]).strip()  # drop a msgctxt prefix
            de = _SPACE.sub(" ", msgstr).strip()
            if en and de and en != de and en not in seen and max(len(en), len(de)) <= MAX_CHARS:
                seen.add(en)
                out.append((en, de))
    return out


def split_of(english: str, val_fraction: float) -> str:
    """``val``, ``test`` or ``train`` by a hash of the English message."""
    k = name_key(english, "split")
    return "val" if k < val_fraction else "test" if k < 2 * val_fraction else "train"
