"""Sequence-to-sequence data: parallel text ► tokenized pairs (cached) ► length-bucketed batches.

Sources (``data.source``): ``dates`` (the embedded task, generated locally),
``system-messages`` (English ► German messages of the installed programs), a ``.tsv`` file
(source TAB target), a ``.jsonl`` file (``data.source_field`` / ``data.target_field``), or a
source file with ``data.target_source`` aligned line by line. Validation and test are the
official files where given (``data.val_source``, ``data.test_source``, same formats), else hash
slices of the source (``read_splits``). Pairs are tokenized with one shared tokenizer or one per
side (HF ``tokenizers``, trained on the training pairs), and cached as ``{split}.npz``
(concatenated ids + offsets per side).

Batches follow fairseq: sentences sorted by length (ties broken by a seeded shuffle) and cut
greedily into micro-batches under a token budget (``data.max_tokens``: sentences × the longest
side) or a sentence count; the order of micro-batches is reshuffled every epoch. Optimizer step
``s`` consumes micro-batches ``[s·G, (s+1)·G)`` with G = grad_accum × dp, micro-step ``m`` of rank
``r`` reading number ``s·G + m·dp + r``: every layout with the same G trains on the same batches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from trainer.config import DataConfig
from trainer.data import dates, system_messages
from trainer.data.corpus import name_key
from trainer.data.shards import publish
from trainer.data.tokenizer import EOS, PAD, load_tokenizer, tokenizer_hash, train_tokenizer
from trainer.errors import DataError

FORMAT_VERSION = 2


# --------------------------------------------------------------------------- reading pairs


def read_pairs(cfg: DataConfig, seed: int = 0) -> list[tuple[str, str]]:
    """Every pair of ``data.source`` (the embedded sources: all their splits together)."""
    if cfg.source == "dates":
        return dates.pairs(cfg.num_pairs, seed)
    if cfg.source == system_messages.NAME:
        return system_messages.pairs()
    return read_pair_file(cfg, cfg.source, cfg.target_source, "data.source")


def read_splits(cfg: DataConfig, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Pairs per split: ``train``, ``val`` and, where the source has one, ``test``.

    Official files (``data.val_source``, ``data.test_source``) are those splits as given, and
    all of ``data.source`` trains; otherwise validation is a hash slice of the source's pairs
    (``system-messages``: of its English messages, with a test slice beside it)."""
    pairs = read_pairs(cfg, seed)
    if cfg.source == system_messages.NAME:
        label = [system_messages.split_of(s, cfg.val_fraction) for s, _ in pairs]
    else:
        label = ["val" if name_key(str(i), "split") < cfg.val_fraction else "train" for i in range(len(pairs))]
    if cfg.val_source:  # the official set validates; the source's own slice trains, in order
        label = ["train" if k == "val" else k for k in label]
    splits: dict[str, list[tuple[str, str]]] = {k: [] for k in ("train", "val", *(("test",) if "test" in label else ()))}
    for p, k in zip(pairs, label, strict=True):
        splits[k].append(p)
    if cfg.val_source:
        splits["val"] = read_pair_file(cfg, cfg.val_source, cfg.val_target_source, "data.val_source")
    if cfg.test_source:
        splits["test"] = read_pair_file(cfg, cfg.test_source, cfg.test_target_source, "data.test_source")
    if not splits["train"] or not splits["val"]:
        raise DataError(f"data.source={cfg.source!r}: {len(pairs)} pairs are too few to split "
                        f"with data.val_fraction={cfg.val_fraction} (or give data.val_source)")
    return splits


def read_pair_file(cfg: DataConfig, source: str, target: str | None, key: str) -> list[tuple[str, str]]:
    """Pairs of one file: ``.tsv`` (source TAB target), ``.jsonl`` (two fields), or ``source``
    aligned line by line with a ``target`` file. ``key`` names ``source`` in messages
    (``data.val_source``; its target is ``data.val_target_source``)."""
    path = Path(source).expanduser()
    if not path.is_file():
        hint = " (or use 'dates' / 'system-messages', the embedded tasks)" if key == "data.source" else ""
        raise DataError(f"{key}={source!r}: no such file{hint}")
    if target:
        tkey = key.replace("source", "target_source")
        tgt = Path(target).expanduser()
        if not tgt.is_file():
            raise DataError(f"{tkey}={target!r}: no such file")
        a, b = _lines(path, cfg), _lines(tgt, cfg)
        if len(a) != len(b):
            raise DataError(f"{key}: {path} has {len(a)} lines but {tkey} {tgt} has {len(b)}: not aligned")
        return list(zip(a, b, strict=True))
    out = _jsonl_pairs(path, cfg) if path.suffix == ".jsonl" else _tsv_pairs(path, cfg)
    if not out:
        raise DataError(f"{key}={source!r}: no pairs")
    return out


def _jsonl_pairs(path: Path, cfg: DataConfig) -> list[tuple[str, str]]:
    out = []
    for i, line in enumerate(_lines(path, cfg), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        for f in (cfg.source_field, cfg.target_field):
            if not isinstance(row, dict) or f not in row:
                raise DataError(f"{path}:{i}: no {f!r} field (set data.source_field / data.target_field)")
        out.append((str(row[cfg.source_field]), str(row[cfg.target_field])))
    return out


def _tsv_pairs(path: Path, cfg: DataConfig) -> list[tuple[str, str]]:
    out = []
    for i, line in enumerate(_lines(path, cfg), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{i}: expected 'source<TAB>target', found {len(parts)} field(s)")
        out.append((parts[0], parts[1]))
    return out


def _lines(path: Path, cfg: DataConfig) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8", errors="replace" if cfg.invalid_utf8 == "replace" else "strict")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start} (set data.invalid_utf8=replace)") from None
    return text.rstrip("\n").split("\n")


# --------------------------------------------------------------------------- prepared pairs


@dataclass
class PairSplit:
    """Token ids of one split: ``src[i]`` / ``tgt[i]`` as numpy arrays."""

    src_ids: np.ndarray
    src_off: np.ndarray
    tgt_ids: np.ndarray
    tgt_off: np.ndarray

    def __len__(self) -> int:
        return len(self.src_off) - 1

    def src(self, i: int) -> np.ndarray:
        return self.src_ids[self.src_off[i]: self.src_off[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_ids[self.tgt_off[i]: self.tgt_off[i + 1]]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        return np.diff(self.src_off), np.diff(self.tgt_off)


@dataclass
class PreparedPairs:
    dir: Path
    meta: dict

    def split(self, name: str) -> PairSplit:
        z = np.load(self.dir / f"{name}.npz")
        return PairSplit(z["src_ids"], z["src_off"], z["tgt_ids"], z["tgt_off"])

    def tokenizer(self, side: str) -> Tokenizer:
        name = "tokenizer.json" if self.meta["shared_vocab"] else f"{side}_tokenizer.json"
        return Tokenizer.from_file(str(self.dir / name))

    def tokenizer_files(self) -> list[Path]:
        return sorted(self.dir.glob("*tokenizer.json"))


def _pack(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encs = encode(texts, add_special_tokens=False)
    lens = np.array([len(e.ids) for e in encs], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(lens)])
    ids = np.concatenate([np.array(e.ids, dtype=np.int32) for e in encs]) if encs else np.zeros(0, np.int32)
    return ids, off


def _pairs_key(cfg: DataConfig, splits: dict[str, list[tuple[str, str]]]) -> str:
    """The cache key: the tokenizer settings and every pair of every split."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{cfg.shared_vocab}|{cfg.tokenizer.kind}|{cfg.tokenizer.vocab_size}"
                       .encode())
    if cfg.tokenizer.path:
        h.update(tokenizer_hash(load_tokenizer(cfg.tokenizer.path)).encode())
    for name, pairs in sorted(splits.items()):
        h.update(f"[{name}]\n".encode())
        for s, t in pairs:
            h.update(f"{s}\t{t}\n".encode())
    return h.hexdigest()


def _tokenizers(cfg: DataConfig, train: list[tuple[str, str]]) -> dict[str, Tokenizer]:
    """Source and target tokenizers: the one given, or trained on the training pairs only."""
    kind, size = cfg.tokenizer.kind, cfg.tokenizer.vocab_size
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
        return {"src": tok, "tgt": tok}
    if cfg.shared_vocab:
        shared = train_tokenizer(kind, [t for p in train for t in p], size)
        return {"src": shared, "tgt": shared}
    return {side: train_tokenizer(kind, [p[i] for p in train], size) for i, side in enumerate(("src", "tgt"))}


def prepare_pairs(cfg: DataConfig, seed: int, log: Callable[[str], None] = print) -> PreparedPairs:
    splits = read_splits(cfg, seed)
    key = _pairs_key(cfg, splits)
    root = cfg.resolved_cache_dir() / "pairs"
    final = root / key[:20]
    if (final / "meta.json").is_file():
        return PreparedPairs(final, json.loads((final / "meta.json").read_text()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:20]}-", dir=root))
    try:
        toks = _tokenizers(cfg, splits["train"])
        if cfg.shared_vocab:
            toks["src"].save(str(tmp / "tokenizer.json"))
        else:
            for side, tok in toks.items():
                tok.save(str(tmp / f"{side}_tokenizer.json"))
        meta = {"format": FORMAT_VERSION, "source": cfg.source, "shared_vocab": cfg.shared_vocab,
                "vocab_size": {s: t.get_vocab_size() for s, t in toks.items()},
                "eos_id": toks["tgt"].token_to_id(EOS), "pad_id": toks["tgt"].token_to_id(PAD),
                "splits": {}}
        if meta["pad_id"] is None or toks["src"].token_to_id(PAD) != meta["pad_id"]:
            raise DataError(f"tokenizer has no {PAD!r} token at a common id on both sides")
        for name, sel in splits.items():
            s_ids, s_off = _pack(toks["src"], [p[0] for p in sel])
            t_ids, t_off = _pack(toks["tgt"], [p[1] for p in sel])
            np.savez(tmp / f"{name}.npz", src_ids=s_ids, src_off=s_off, tgt_ids=t_ids, tgt_off=t_off)
            meta["splits"][name] = {"pairs": len(sel), "src_tokens": int(s_off[-1]), "tgt_tokens": int(t_off[-1])}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, final)
        counts = ", ".join(f"{v['pairs']:,} {k}" for k, v in meta["splits"].items())
        log(f"prepared {sum(map(len, splits.values())):,} pairs ({counts}) -> {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedPairs(final, json.loads((final / "meta.json").read_text()))


# --------------------------------------------------------------------------- batches


def make_buckets(split: PairSplit, max_len: int, micro_batch: int, max_tokens: int | None,
                 seed: int) -> tuple[list[np.ndarray], int]:
    """Length-sorted micro-batches of pair indices; also returns how many pairs were too long."""
    src_len, tgt_len = split.lengths()
    # +1: the decoder reads BOS + target and predicts target + EOS.
    longest = np.maximum(src_len, tgt_len + 1)
    keep = np.flatnonzero((longest <= max_len) & (src_len > 0))
    rng = np.random.default_rng(seed)
    order = keep[rng.permutation(len(keep))]
    order = order[np.argsort(longest[order], kind="stable")]
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, int(longest[i]))
        too_many = len(cur) >= micro_batch if max_tokens is None else new_max * (len(cur) + 1) > max_tokens
        if cur and too_many:
            batches.append(np.array(cur))
            cur, new_max = [], int(longest[i])
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(np.array(cur))
    return batches, len(src_len) - len(keep)


def target_tensors(tgts: Sequence[Sequence[int]], pad: int, bos: int, eos: int) -> dict[str, torch.Tensor]:
    """The decoder's side of a batch: ``tgt_in`` = BOS + target (padded with ``pad``) and
    ``labels`` = target + EOS (padded with -100)."""
    t_len = max(len(t) for t in tgts) + 1
    tgt_in = torch.full((len(tgts), t_len), pad, dtype=torch.long)
    labels = torch.full((len(tgts), t_len), -100, dtype=torch.long)
    for r, t in enumerate(tgts):
        t = torch.as_tensor(np.asarray(t, dtype=np.int64))
        tgt_in[r, 0] = bos
        tgt_in[r, 1: len(t) + 1] = t
        labels[r, : len(t)] = t
        labels[r, len(t)] = eos
    return {"tgt_in": tgt_in, "labels": labels}


class PairBatches:
    """Micro-batches of (source, target) pairs for training and evaluation."""

    def __init__(self, split: PairSplit, buckets: list[np.ndarray], accum: int, dp: int,
                 pad_id: int, bos_id: int, eos_id: int, seed: int, shuffle: bool = True) -> None:
        if not buckets:
            raise DataError("no sequence pairs fit within data.seq_len")
        self.split, self.buckets = split, buckets
        self.per_step = accum * dp
        self.dp = dp
        self.pad, self.bos, self.eos = pad_id, bos_id, eos_id
        self.seed, self.shuffle = seed, shuffle
        self._perm_epoch, self._perm = -1, np.arange(0)

    def __len__(self) -> int:
        return len(self.buckets)

    def _bucket(self, k: int) -> np.ndarray:
        epoch, pos = divmod(k, len(self.buckets))
        if self.shuffle and epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.buckets), generator=g).numpy(), epoch
        return self.buckets[self._perm[pos] if self.shuffle else pos]

    def collate(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        srcs = [self.split.src(i) for i in idx]
        src = torch.full((len(idx), max(len(s) for s in srcs)), self.pad, dtype=torch.long)
        for r, s in enumerate(srcs):
            src[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
        # The source lengths stay on the host (a list, which the move to the device leaves
        # alone): the models build masks and packed sequences from them without reading the
        # device, and attend without any mask to a batch that has no padding.
        return {"src": src, **target_tensors([self.split.tgt(i) for i in idx], self.pad, self.bos, self.eos),
                "src_lengths": [max(1, len(s)) for s in srcs]}

    def micro_batch(self, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        return self.collate(self._bucket(step * self.per_step + micro * self.dp + rank))

    @property
    def eval_capacity(self) -> int:
        """Evaluation batches before a bucket would be read a second time."""
        return len(self.buckets)

    def eval_batches(self, rank: int, dp: int, n: int) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(n):
            yield self.collate(self.buckets[(b * dp + rank) % len(self.buckets)])

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / len(self.buckets)
