"""Scenes of coloured shapes and their captions: the embedded image-captioning task.

A scene holds two things (a shape, a colour and a size each) in a spatial relation ("left of",
"right of", "above", "below"), drawn from (seed, split, index) and rendered as an ``IMAGE_SIZE``
square RGB image: the first thing in one half of the picture, the second in the other, on a
dark background with brightness jitter and pixel noise. Nothing is downloaded or cached.

Captions come from a small grammar that varies word order and synonyms: "a small red circle
left of a big blue square", "there is a large blue square to the right of a little red circle".
``Scene.captions`` lists every caption the grammar gives a scene (the same number for each);
a training example is one of them, drawn per scene, and evaluation takes them all as references.

Splits: ``train`` and ``val`` never show a colour on a shape listed in ``HELD_OUT``; every
``test`` scene shows at least one such combination, whose colour and shape were each seen in
training, but never together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainer.config import DataConfig
from trainer.errors import DataError

NAME = "scenes"
"""``data.source`` of the embedded task."""
IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.2, 0.35, 0.95),
           "yellow": (0.95, 0.85, 0.15)}
RADIUS = {"small": 3.5, "large": 6.5}
"""Half the extent of a thing in pixels, by size."""
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
                  "above": ("above", "over"), "below": ("below", "under")}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
"""(colour, shape) combinations only test scenes show."""
NOISE = 0.03
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str

    def phrases(self) -> list[str]:
        return [f"a {w} {self.colour} {self.shape}" for w in SIZE_WORDS[self.size]]


@dataclass(frozen=True)
class Scene:
    a: Thing
    b: Thing
    relation: str
    """How ``a`` stands to ``b``."""
    a_xy: tuple[float, float]
    b_xy: tuple[float, float]

    def captions(self) -> list[str]:
        """Every caption of the grammar: either thing first (with the relation inverted),
        with or without "there is", and each synonym of sizes and relations."""
        out = []
        for first, rel, second in ((self.a, self.relation, self.b), (self.b, INVERSE[self.relation], self.a)):
            for lead, r, p1, p2 in product(("", "there is "), RELATION_WORDS[rel], first.phrases(), second.phrases()):
                out.append(f"{lead}{p1} {r} {p2}")
        return out


THINGS = [Thing(s, c, z) for s in SHAPES for c in COLOURS for z in RADIUS]
SEEN = [t for t in THINGS if (t.colour, t.shape) not in HELD_OUT]
UNSEEN = [t for t in THINGS if (t.colour, t.shape) in HELD_OUT]


def _place(rng: np.random.Generator, relation: str, ra: float, rb: float) -> tuple[tuple[float, float], ...]:
    """Centres (x, y) of a and b: a in the half of the picture its relation to b names."""
    half = IMAGE_SIZE / 2

    def along(r: float, first_half: bool) -> float:
        lo, hi = (r + 1, half - r - 1) if first_half else (half + r + 1, IMAGE_SIZE - r - 1)
        return float(rng.uniform(lo, hi))

    def across(r: float) -> float:
        return float(rng.uniform(r + 1, IMAGE_SIZE - r - 1))

    a_first = relation in ("left", "above")
    pa, pb = along(ra, a_first), along(rb, not a_first)
    if relation in ("left", "right"):
        return (pa, across(ra)), (pb, across(rb))
    return (across(ra), pa), (across(rb), pb)


def scene(seed: int, split: str, i: int) -> tuple[Scene, str]:
    """Scene ``i`` of ``split`` and the caption it trains with."""
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    if split == "test":  # one unseen combination, on either side of the relation
        pair = [UNSEEN[rng.integers(len(UNSEEN))], THINGS[rng.integers(len(THINGS))]]
        if rng.integers(2):
            pair.reverse()
    else:
        pair = [SEEN[rng.integers(len(SEEN))], SEEN[rng.integers(len(SEEN))]]
    relation = list(RELATION_WORDS)[rng.integers(4)]
    a_xy, b_xy = _place(rng, relation, RADIUS[pair[0].size], RADIUS[pair[1].size])
    s = Scene(pair[0], pair[1], relation, a_xy, b_xy)
    caps = s.captions()
    return s, caps[rng.integers(len(caps))]


def render(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as a (3, ``IMAGE_SIZE``, ``IMAGE_SIZE``) float32 image in [0, 1]."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    img = np.full((3, IMAGE_SIZE, IMAGE_SIZE), 0.08, dtype=np.float32)
    for thing, (cx, cy) in ((s.a, s.a_xy), (s.b, s.b_xy)):
        r, dx, dy = RADIUS[thing.size], xx - cx, yy - cy
        if thing.shape == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif thing.shape == "square":
            inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        else:  # a triangle, apex up: as wide as the square at its base
            inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        colour = np.array(COLOURS[thing.colour], dtype=np.float32) * rng.uniform(0.85, 1.0)
        img[:, inside] = colour[:, None]
    img += rng.normal(0, NOISE, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


class SceneSplit:
    """One split's scenes, their training captions, and images rendered on demand."""

    def __init__(self, name: str, n: int, seed: int) -> None:
        self.name, self.seed = name, seed
        drawn = [scene(seed, name, i) for i in range(n)]
        self.scenes = [s for s, _ in drawn]
        self.targets = [c for _, c in drawn]

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.name), i, 1])
        return render(self.scenes[i], rng)

    def images(self, idx: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.image(i) for i in idx]))

    def references(self, i: int) -> list[str]:
        return self.scenes[i].captions()


def read_splits(cfg: DataConfig, seed: int) -> dict[str, SceneSplit]:
    """``data.num_pairs`` training scenes; validation and test scenes, ``data.val_fraction``
    of that each (at least 64)."""
    if cfg.source != NAME:
        raise DataError(f"data.source={cfg.source!r}: an image source trains on {NAME!r}, the embedded "
                        "captioning task")
    held = max(64, round(cfg.num_pairs * cfg.val_fraction))
    return {k: SceneSplit(k, cfg.num_pairs if k == "train" else held, seed) for k in SPLITS}


def read_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """An image file as a captioning model reads it: (channels, size, size) floats in [0, 1].
    One line naming the file per problem: unreadable, another channel count, another size."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, w, h = im.mode, im.width, im.height
            bands = len(im.getbands())
            a = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not an image Pillow can decode ({e})") from None
    if bands - ("A" in mode) != channels:
        raise DataError(f"{path}: {bands} channel(s) (mode {mode}); the model reads {channels} "
                        f"({'RGB' if channels == 3 else 'grey'}, model.source.channels)")
    if (w, h) != (size, size):
        raise DataError(f"{path}: {w}x{h} pixels; the model reads {size}x{size} (model.source.size)")
    return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
