"""Spoken sentences synthesised locally with espeak-ng: the embedded speech task.

The sentences are the English side of the ``dates`` task ("the fifth of may, 1987"), each
spoken by espeak-ng (a Debian package; ``make test`` installs it) with a voice, a speed (words
per minute) and a pitch drawn from (seed, split, index). Splits are by a hash of the text:
training and validation sentences are spoken by ``TRAIN_VOICES``; test sentences by
``TEST_VOICE``, an accent and a timbre no training sound has (training draws among six accents
and twelve timbres), so recognition must carry over to a speaker it never heard.

espeak-ng speaks at 22,050 Hz; the sounds are resampled (``scipy.signal.resample_poly``) to the
model's ``sample_rate`` and cached per split as ``{split}.npz`` (int16 samples, concatenated,
and offsets) under a hash of the texts, the voices, the rate and espeak-ng's version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data import dates
from trainer.data.corpus import name_key
from trainer.data.shards import publish
from trainer.errors import DataError

NAME = "speech"
"""``data.source`` of the embedded task."""
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
"""espeak-ng's English accents that training sentences are read in."""
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f4", "+f5")
"""espeak-ng's voice variants (male and female timbres) drawn with an accent."""
TRAIN_VOICES = tuple(a + v for a in ACCENTS for v in VARIANTS)
TEST_VOICE = "en-gb-scotland+f3"
"""An accent and a variant that no training sentence has."""
SPEEDS = (130, 200)
"""Words per minute, drawn uniformly."""
PITCHES = (25, 75)
"""espeak-ng's pitch (0-99), drawn uniformly."""
ESPEAK_RATE = 22050
FORMAT_VERSION = 1


@lru_cache(maxsize=1)
def espeak_version() -> str:
    """espeak-ng's version line; one clear line when it is missing."""
    if shutil.which("espeak-ng") is None:
        raise DataError("data.source='speech' needs espeak-ng: run `make test` (installs it), or "
                        "`apt-get install espeak-ng`")
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()


def speak(text: str, voice: str, speed: int, pitch: int, sample_rate: int) -> np.ndarray:
    """espeak-ng's reading of ``text`` as float32 samples in [-1, 1] at ``sample_rate``."""
    p = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                       capture_output=True, check=False)
    if p.returncode != 0 or not p.stdout.startswith(b"RIFF"):
        raise DataError(f"espeak-ng -v {voice} failed on {text!r}: {p.stderr.decode(errors='replace').strip()}")
    # A streamed WAV: its size fields are placeholders, so the samples are whatever follows the
    # "data" chunk header.
    raw = np.frombuffer(p.stdout[p.stdout.index(b"data") + 8:], dtype="<i2").astype(np.float32) / 32768.0
    return resample(raw, ESPEAK_RATE, sample_rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    # scipy.signal costs about a second to import: every training process imports this module,
    # only speech runs resample.
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


@dataclass(frozen=True)
class Reading:
    voice: str
    speed: int
    pitch: int


def reading(seed: int, split: str, i: int) -> Reading:
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), i])
    voice = TEST_VOICE if split == "test" else TRAIN_VOICES[rng.integers(len(TRAIN_VOICES))]
    return Reading(voice, int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)), int(rng.integers(PITCHES[0], PITCHES[1] + 1)))


class SpeechSplit:
    """One split's transcripts and sounds (int16 in the cache, floats when read)."""

    def __init__(self, name: str, texts: list[str], audio: np.ndarray, offsets: np.ndarray, rate: int) -> None:
        self.name, self.texts, self.audio, self.offsets, self.rate = name, texts, audio, offsets, rate

    def __len__(self) -> int:
        return len(self.texts)

    def sound(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i]: self.offsets[i + 1]].astype(np.float32) / 32768.0

    def seconds(self) -> np.ndarray:
        return np.diff(self.offsets) / self.rate


def split_texts(cfg: DataConfig, seed: int) -> dict[str, list[str]]:
    """The English sides of ``data.num_pairs`` dates, by a hash of the text: ``val_fraction``
    to test, as much to validation, the rest to training."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for text, _ in dates.pairs(cfg.num_pairs, seed):
        k = name_key(text, "speech")
        parts["test" if k < cfg.val_fraction else "val" if k < 2 * cfg.val_fraction else "train"].append(text)
    return parts


def read_splits(cfg: DataConfig, seed: int, sample_rate: int, log: Callable[[str], None] = print,
                ) -> dict[str, SpeechSplit]:
    """Every split's sounds: from the cache, or synthesised (all cores) and cached."""
    if cfg.source != NAME:
        raise DataError(f"data.source={cfg.source!r}: a sound source trains on {NAME!r}, the embedded speech task")
    texts = split_texts(cfg, seed)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, espeak_version(), sample_rate, seed, TRAIN_VOICES, TEST_VOICE,
                                     SPEEDS, PITCHES, texts]).encode()).hexdigest()[:20]
    root = cfg.resolved_cache_dir() / "speech"
    final = root / key
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            for split, items in texts.items():
                _synthesise(items, split, seed, sample_rate, tmp / f"{split}.npz")
            (tmp / "meta.json").write_text(json.dumps({"espeak": espeak_version(), "sample_rate": sample_rate,
                                                       "sounds": {k: len(v) for k, v in texts.items()}}))
            publish(tmp, final)
            log(f"spoke {sum(map(len, texts.values())):,} sentences with espeak-ng -> {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for split, items in texts.items():
        z = np.load(final / f"{split}.npz")
        out[split] = SpeechSplit(split, items, z["audio"], z["offsets"], sample_rate)
    return out


def _synthesise(texts: list[str], split: str, seed: int, sample_rate: int, path: Path) -> None:
    def one(i: int) -> np.ndarray:
        r = reading(seed, split, i)
        return np.round(np.clip(speak(texts[i], r.voice, r.speed, r.pitch, sample_rate), -1, 1) * 32767).astype(np.int16)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # espeak-ng runs in processes
        sounds = list(pool.map(one, range(len(texts))))
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sounds])]).astype(np.int64)
    audio = np.concatenate(sounds) if sounds else np.zeros(0, np.int16)
    np.savez(path, audio=audio, offsets=offsets)


def sound_batch(sounds: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
    """Sounds padded with silence to the longest, and their lengths (a host list)."""
    out = torch.zeros(len(sounds), max(len(s) for s in sounds))
    for r, s in enumerate(sounds):
        out[r, : len(s)] = torch.from_numpy(s)
    return out, [len(s) for s in sounds]


def read_wav(path: str | Path, sample_rate: int) -> np.ndarray:
    """A WAV file as a speech model reads it: mono float32 in [-1, 1] at ``sample_rate``.
    One line naming the file per problem: unreadable, not mono, another rate, empty."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, rate, width, n = w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as e:
        raise DataError(f"{path}: not a WAV file Python's wave module can decode ({e})") from None
    if channels != 1:
        raise DataError(f"{path}: {channels} channels; the model reads mono sound (model.source.channels=1)")
    if rate != sample_rate:
        raise DataError(f"{path}: {rate} Hz; the model reads {sample_rate} Hz (model.source.sample_rate)")
    if width != 2:
        raise DataError(f"{path}: {8 * width}-bit samples; the model reads 16-bit PCM")
    if n == 0:
        raise DataError(f"{path}: no samples")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path: str | Path, sound: np.ndarray, sample_rate: int) -> Path:
    """``sound`` (floats in [-1, 1]) as a mono 16-bit PCM WAV file."""
    pcm = np.round(np.clip(sound, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    Path(path).write_bytes(buf.getvalue())
    return Path(path)
