"""Weighted mixtures of sources (``data.mixture``): one tokenizer, each source prepared and
cached on its own, and a batch schedule that draws every global batch from the sources by
weight.

The schedule stays a pure function of (seed, step, micro-step, rank). The number of samples
source k has given after T samples of the mixture is the Sainte-Laguë (Webster) apportionment
of T by the weights (``apportion``): the T largest of the priorities w_k / (2n + 1), n = 0, 1,
..., ties to the earlier source. Being the top T of one fixed order, the apportionment of T + G
contains that of T (a divisor method never takes a sample back, unlike largest remainders), so
step s draws ``apportion(G (s + 1)) - apportion(G s)`` samples of each source: the weights'
shares of every batch up to rounding, and exactly in the long run (within a sample or two of
w_k T, whatever T). Source k's samples are its own shuffled epochs of windows (``BatchSchedule``
with a seed of its own), read in order; a step's slots are then shuffled by (seed, step), so
each micro-batch mixes the sources, and micro-step m of rank r takes slots
``(m dp + r) micro ...``: every layout with the same global batch reads the same sequences.

A change of weights (or of the global batch) on resume starts a new *segment*: from step s0 on,
the counts are those at s0 plus the apportionment of ``G (s - s0)`` by the new weights. The
segments are saved with the loop's state, so a later resume repeats them.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig, MixtureSource
from trainer.data import pretokenized
from trainer.data.corpus import Corpus
from trainer.data.sampler import BatchSchedule, LMBatches, WindowDataset, mark_documents
from trainer.data.shards import PreparedData, prepare, writer_tag
from trainer.data.tokenizer import load_tokenizer, sample, tokenizer_hash, train_tokenizer
from trainer.errors import DataError

# ------------------------------------------------------------------ preparation


def source_config(cfg: DataConfig, m: MixtureSource, tokenizer: Path) -> DataConfig:
    """The single-source data config of one mixture source, with the mixture's tokenizer."""
    pick = lambda own, common: common if own is None else own  # noqa: E731
    return cfg.model_copy(update={
        "source": m.source, "mixture": None,
        "text_field": pick(m.text_field, cfg.text_field), "hf_config": pick(m.hf_config, cfg.hf_config),
        "hf_data_files": pick(m.hf_data_files, cfg.hf_data_files), "max_bytes": pick(m.max_bytes, cfg.max_bytes),
        "tokenizer": cfg.tokenizer.model_copy(update={"path": str(tokenizer)}),
    })


def _given_tokenizer(cfg: DataConfig) -> Path | None:
    """``data.tokenizer.path``, else the first source's own tokenizer; every source's own one
    must be the same (ids from two vocabularies cannot share an embedding)."""
    given = [(f"data.tokenizer.path={cfg.tokenizer.path!r}", cfg.tokenizer.path)] if cfg.tokenizer.path else []
    given += [(f"data.mixture source {m.label!r} (tokenizer {m.tokenizer!r})", m.tokenizer)
              for m in cfg.mixture if m.tokenizer]
    if not given:
        return None
    first_what, first = given[0]
    first_hash = tokenizer_hash(load_tokenizer(first))
    for what, path in given[1:]:
        if tokenizer_hash(load_tokenizer(path)) != first_hash:
            raise DataError(f"{what} differs from {first_what}: every source of a mixture needs the "
                            "same tokenizer")
    p = Path(first).expanduser()
    return p / "tokenizer.json" if p.is_dir() else p


@contextmanager
def _naming(m: MixtureSource):
    """A data error of one source, prefixed with which source of the mixture it is."""
    try:
        yield
    except DataError as e:
        raise DataError(f"data.mixture source {m.label!r}: {e}") from None


def _train_mixture_tokenizer(cfg: DataConfig, log: Callable[[str], None]) -> Path:
    """A tokenizer trained on ``data.tokenizer.train_bytes`` of the training texts of the
    sources with a positive weight, an equal share of each (not by weight: a resume with new
    weights keeps its tokenizer); cached by those sources' fingerprints and the settings."""
    tok_cfg = cfg.tokenizer
    corpora = []
    for m in cfg.mixture:
        if pretokenized.kind(source_config(cfg, m, Path("-"))):
            raise DataError(f"data.mixture source {m.label!r} holds token ids: set its tokenizer (or "
                            "data.tokenizer.path) to the tokenizer.json that made them")
        if m.weight > 0:
            with _naming(m):
                corpora.append(Corpus(source_config(cfg, m, Path("-"))))
    h = hashlib.sha256(f"{tok_cfg.kind}|{tok_cfg.vocab_size}|{tok_cfg.train_bytes}".encode())
    for corpus in corpora:
        h.update(f"|{corpus.fingerprint()}".encode())
    path = cfg.resolved_cache_dir() / "tokenizers" / f"{h.hexdigest()[:20]}.json"
    if path.is_file():
        return path

    def texts():
        for corpus in corpora:
            split = "train" if next(corpus.texts("train"), None) is not None else "all"
            yield from sample(corpus.texts(split), tok_cfg.train_bytes // len(corpora))

    log(f"training a {tok_cfg.vocab_size}-token {tok_cfg.kind} tokenizer on a sample of "
        f"{len(corpora)} mixture sources")
    tok = train_tokenizer(tok_cfg.kind, texts(), tok_cfg.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{writer_tag()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # whole or absent, whoever finishes last
    return path


def prepare_mixture(cfg: DataConfig, log: Callable[[str], None] = print, workers: int = 1,
                    part: tuple[int, int] | None = None) -> list[tuple[MixtureSource, PreparedData | None]]:
    """Every source of ``data.mixture`` prepared (or read from its cache) with one tokenizer
    (``workers`` and ``part`` as ``shards.prepare`` takes them: None for a source whose other
    parts are still missing)."""
    tokenizer = _given_tokenizer(cfg) or _train_mixture_tokenizer(cfg, log)
    out = []
    for m in cfg.mixture:
        with _naming(m):
            out.append((m, prepare(source_config(cfg, m, tokenizer), log=log, workers=workers, part=part)))
    return out


# ------------------------------------------------------------------ schedule


def exact_weights(weights: list[float]) -> list[Fraction]:
    """The weights as exact fractions (of their decimal form), so the apportionment's ties and
    order do not depend on floating-point rounding."""
    return [Fraction(repr(float(w))) for w in weights]


def apportion(weights: list[Fraction], total: int) -> list[int]:
    """Sainte-Laguë apportionment of ``total`` samples: the ``total`` largest priorities
    w_k / (2n + 1) (ties to the lower k). Starts from the rounded quotas and moves a sample at
    a time until the set is the top ``total`` (at most about K moves)."""
    wsum = sum(weights)
    c = [math.floor(w * total / wsum + Fraction(1, 2)) for w in weights]
    nxt = lambda k: (weights[k] / (2 * c[k] + 1), -k)  # noqa: E731  the next sample's priority
    last = lambda k: (weights[k] / (2 * c[k] - 1), -k)  # noqa: E731  the last taken one's
    while True:
        gaining = max(range(len(c)), key=nxt)
        held = [k for k in range(len(c)) if c[k] > 0]
        losing = min(held, key=last) if held else None
        have = sum(c)
        if have < total:
            c[gaining] += 1
        elif have > total:
            c[losing] -= 1
        elif losing is not None and nxt(gaining) > last(losing):
            c[gaining] += 1
            c[losing] -= 1
        else:
            return c


class Segment:
    """Steps from ``step`` on, drawn with ``weights`` and global batch ``global_batch`` on top
    of the per-source counts ``base`` reached at ``step``."""

    def __init__(self, step: int, global_batch: int, weights: dict[str, float], base: dict[str, int]) -> None:
        self.step, self.global_batch, self.weights, self.base = step, global_batch, weights, base
        self._exact = exact_weights(list(weights.values()))

    def counts(self, step: int) -> dict[str, int]:
        """Samples each source has given before ``step`` (this segment's names and earlier ones)."""
        drawn = apportion(self._exact, self.global_batch * (step - self.step))
        out = dict(self.base)
        for name, n in zip(self.weights, drawn, strict=True):
            out[name] = out.get(name, 0) + n
        return out

    def state(self) -> dict:
        return {"step": self.step, "global_batch": self.global_batch, "weights": self.weights, "base": self.base}


def _source_seed(seed: int, name: str) -> int:
    """Each source's epoch orders: independent of the others, and of where it is listed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


class MixtureBatches:
    """Training micro-batches of a mixture (see the module docstring)."""

    def __init__(self, sources: dict[str, tuple[float, WindowDataset]], micro: int, accum: int, dp: int,
                 seed: int, document_eos: int | None = None, say: Callable[[str], None] = print) -> None:
        self.data = {name: ds for name, (_, ds) in sources.items()}
        self.seq_len = next(iter(self.data.values())).seq_len
        self.micro, self.dp, self.seed = micro, dp, seed
        self.global_batch = micro * accum * dp
        self.document_eos, self.say = document_eos, say
        self.orders = {name: BatchSchedule(len(ds), micro, accum, dp, _source_seed(seed, name))
                       for name, ds in self.data.items()}
        self.weights = {name: w for name, (w, _) in sources.items()}
        self.segments = [Segment(0, self.global_batch, self.weights, {})]
        self._slots: tuple[int, list[tuple[str, int]]] = (-1, [])
        self._epochs = {name: 0 for name in self.data}

    def counts(self, step: int) -> dict[str, int]:
        """Samples each source has given before ``step``."""
        seg = next(s for s in reversed(self.segments) if s.step <= step)
        return seg.counts(step)

    def slots(self, step: int) -> list[tuple[str, int]]:
        """Step ``step``'s global batch: (source, window) per slot, shuffled by (seed, step)."""
        cached_step, cached = self._slots  # one tuple: safe to read beside the prefetch thread
        if cached_step == step:
            return cached
        before, after = self.counts(step), self.counts(step + 1)
        slots = []
        for name, order in self.orders.items():
            first = before.get(name, 0)
            slots += [(name, int(w)) for w in order.windows(first, after.get(name, 0) - first)]
        mix = np.random.default_rng([self.seed, step, 0x6D6978]).permutation(len(slots))
        slots = [slots[i] for i in mix]
        self._slots = (step, slots)
        return slots

    def micro_batch(self, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        first = (micro * self.dp + rank) * self.micro
        L = self.seq_len
        rows = [self.data[name].tokens[w * L: w * L + L + 1] for name, w in self.slots(step)[first: first + self.micro]]
        t = torch.from_numpy(np.stack(rows).astype(np.int64))
        return mark_documents({"input_ids": t[:, :-1], "labels": t[:, 1:]}, self.document_eos)

    def epoch_of(self, step: int) -> float:
        """Passes over the mixture's windows, counted in windows read."""
        return step * self.global_batch / sum(len(ds) for ds in self.data.values())

    def metrics(self, step: int) -> dict[str, float]:
        """Tokens and epochs of each source so far; a line when a source has started over."""
        out: dict[str, float] = {}
        for name, n in self.counts(step).items():
            if name not in self.data:
                continue  # dropped from the mixture on a resume
            epoch = n / len(self.data[name])
            out[f"tokens/{name}"] = n * self.seq_len
            out[f"epoch/{name}"] = epoch
            if int(epoch) > self._epochs[name]:
                self._epochs[name] = int(epoch)
                self.say(f"data.mixture source {name!r} ran out by step {step}: epoch {int(epoch) + 1} "
                         "reads its windows again, in a new order")
        return out

    def schedule_state(self) -> dict:
        """The segments (saved with the loop's state: the same on every rank)."""
        return {"mixture_segments": [s.state() for s in self.segments]}

    def load_schedule_state(self, state: dict | None, step: int, allow_change: bool) -> None:
        """Take the checkpoint's segments; new weights (or sources) start a segment at ``step``
        when ``allow_change``, else the resume is refused. A new global batch always does."""
        saved = [Segment(**s) for s in (state or {}).get("mixture_segments", [])]
        if not saved and step == 0:
            return
        had = saved[-1].weights if saved else "no mixture"
        if had != self.weights:
            if not allow_change:
                raise DataError(f"resuming at data step {step + 1} with data.mixture weights {self.weights} where the "
                                f"checkpoint has {had}: restore them, or set data.allow_mixture_change=true "
                                "to apply the new ones from this step")
            self.say(f"data.mixture changes from data step {step + 1}: {had} -> {self.weights}")
        self.segments = saved or [Segment(step, self.global_batch, self.weights, {})]
        last = self.segments[-1]
        if last.weights != self.weights or last.global_batch != self.global_batch:
            self.segments.append(Segment(step, self.global_batch, self.weights, self.counts(step)))
        counts = self.counts(step)
        self._epochs = {n: counts.get(n, 0) // len(ds) for n, ds in self.data.items()}


class MixtureEval:
    """Validation of a mixture: each source's windows on their own; the trainer reports each
    source's loss and their weighted mean."""

    def __init__(self, parts: list[tuple[str, float, LMBatches]]) -> None:
        self.parts = parts
