"""Text-line images for handwriting-style recognition (the task Graves et al. used the
multidimensional LSTM for), rendered locally: no download.

Lines of text (the English side of the embedded ``dates`` task, ``april 1st, 2038``, or the
lines of a text file) are drawn glyph by glyph in grey at ``HEIGHT`` pixels with a DejaVu font
that matplotlib ships (``mpl-data/fonts/ttf``, a dependency already): a random size (scale),
a random vertical offset and extra spacing per glyph (jitter), and Gaussian noise. Every image
is a pure function of (seed, split, index), rendered when its batch is built: nothing is cached.

Splits by a hash of the text. Training and validation lines use ``TRAIN_FONTS``; the test lines
are drawn with ``TEST_FONT``, a slanted face no training line has: recognition must carry over
to a distortion it never saw.

An image is ``HEIGHT`` × width floats, ink 1 and paper 0. A label is the text as ids into
``ALPHABET`` from 1 (0 is CTC's blank).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer.config import DataConfig
from trainer.data import dates
from trainer.data.corpus import name_key
from trainer.errors import DataError

ALPHABET = " ,-./0123456789abcdefghijklmnopqrstuvwxyz"
"""Characters a line may hold; label ids are their positions plus one."""
HEIGHT = 32
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf")
TEST_FONT = "DejaVuSans-Oblique.ttf"
SIZES = (15, 20)
"""Font sizes in points, drawn uniformly (the scale distortion)."""
NOISE = 0.08
"""Std of the Gaussian pixel noise."""


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib  # for its fonts only; a fifth of a second to import, in every training process

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def render(text: str, font: str, rng: np.random.Generator) -> np.ndarray:
    """``text`` as a (``HEIGHT``, width) float32 image: glyph by glyph with jitter, then noise."""
    f = _font(font, int(rng.integers(SIZES[0], SIZES[1] + 1)))
    width = int(f.getlength(text) + 2 * len(text) + 8)
    img = Image.new("L", (width, HEIGHT), 0)
    draw = ImageDraw.Draw(img)
    top = (HEIGHT - f.size) // 2 - 2
    x = 2.0 + rng.uniform(0, 2)
    for ch in text:
        draw.text((x, top + int(rng.integers(-1, 2))), ch, font=f, fill=255)
        x += f.getlength(ch) + rng.uniform(0, 1.5)
    a = np.asarray(img, dtype=np.float32)[:, : int(np.ceil(x)) + 2] / 255.0
    return np.clip(a + rng.normal(0, NOISE, a.shape).astype(np.float32), 0.0, 1.0)


def encode(text: str, where: str) -> list[int]:
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise DataError(f"{where}: {''.join(bad)!r} not in the label alphabet {ALPHABET!r}")
    return [ALPHABET.index(c) + 1 for c in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))


class LineSplit:
    """One split's texts, rendered on demand with its fonts."""

    def __init__(self, texts: list[str], fonts: tuple[str, ...], seed: int, name: str) -> None:
        self.texts, self.fonts, self.seed, self.name = texts, fonts, seed, name
        self.labels = [encode(t, f"{name} line {i + 1}") for i, t in enumerate(texts)]

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, ("train", "val", "test").index(self.name), i])
        return render(self.texts[i], self.fonts[i % len(self.fonts)], rng)

    def batch(self, idx: Sequence[int]) -> dict:
        return line_batch([self.image(i) for i in idx], [self.labels[i] for i in idx])


def line_batch(images: Sequence[np.ndarray], labels: Sequence[list[int]] | None = None) -> dict:
    """Images padded on the right to the widest (paper, 0) as ``images`` (B, H, W), their
    ``widths`` (a host list) and, with labels, ``labels`` (B, L) padded with -100 and their
    ``label_lengths`` (a host list)."""
    out = {"images": torch.zeros(len(images), HEIGHT, max(a.shape[1] for a in images)),
           "widths": [a.shape[1] for a in images]}
    for r, a in enumerate(images):
        out["images"][r, :, : a.shape[1]] = torch.from_numpy(a)
    if labels is not None:
        out["labels"] = torch.full((len(labels), max(map(len, labels))), -100, dtype=torch.long)
        for r, y in enumerate(labels):
            out["labels"][r, : len(y)] = torch.tensor(y)
        out["label_lengths"] = [len(y) for y in labels]
    return out


def read_splits(cfg: DataConfig, seed: int) -> dict[str, LineSplit]:
    """``train`` and ``val`` (training fonts) and ``test`` (``TEST_FONT``): hash slices of the
    texts of ``data.source`` (``textlines``: the English dates of ``data.num_pairs`` generated
    pairs; else a text file, one line per image)."""
    if cfg.source == "textlines":
        texts = [s for s, _ in dates.pairs(cfg.num_pairs, seed)]
    else:
        path = Path(cfg.source)
        if not path.is_file():
            raise DataError(f"data.source={cfg.source!r}: no such file (or 'textlines', the embedded task)")
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                encode(line.strip(), f"{path}:{lineno}")  # every character must be a label
                texts.append(line.strip())
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for t in texts:
        k = name_key(t, "textlines")
        parts["test" if k < cfg.val_fraction else "val" if k < 2 * cfg.val_fraction else "train"].append(t)
    for k in ("train", "val"):
        if not parts[k]:
            raise DataError(f"data.source={cfg.source!r}: {len(texts)} lines leave the {k} split empty "
                            f"with data.val_fraction={cfg.val_fraction}")
    return {k: LineSplit(v, (TEST_FONT,) if k == "test" else TRAIN_FONTS, seed, k) for k, v in parts.items()}


def read_image(path: str | Path) -> np.ndarray:
    """A grey image file as the model reads it: scaled to ``HEIGHT`` rows, ink 1 on paper 0
    (dark text on light paper is inverted). One line per problem."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if img.mode not in ("L", "1", "I;16"):
        raise DataError(f"{path}: {len(img.getbands())} channels ({img.mode}); expected a grey (1-channel) image")
    img = img.convert("L")
    w = max(1, round(img.width * HEIGHT / img.height))
    a = np.asarray(img.resize((w, HEIGHT)), dtype=np.float32) / 255.0
    return 1.0 - a if a.mean() > 0.5 else a
