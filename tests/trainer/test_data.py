"""Data path: corpus split, packed shards and their cache, the batch schedule's invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data import BatchSchedule, WindowDataset, prepare
from trainer.data.corpus import list_files, select, split
from trainer.data.shards import token_dtype
from trainer.errors import DataError


def data_cfg(source, cache, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(cache), seq_len=16,
                      tokenizer={"vocab_size": kw.pop("vocab_size", 300)}, **kw)


def test_stdlib_corpus_split_is_deterministic_disjoint_and_capped():
    files = select(list_files("stdlib"), 2_000_000)
    assert 1_000_000 < sum(f.size for f in files) <= 2_000_000
    assert all(f.name.endswith(".py") and not f.name.startswith(("encodings/", "site-packages/")) for f in files)
    a, b = split(files, 0.1), split(list(reversed(files)), 0.1)
    assert {f.name for f in a["val"]} == {f.name for f in b["val"]}
    assert not {f.name for f in a["train"]} & {f.name for f in a["val"]}
    assert len(a["train"]) + len(a["val"]) == len(files)


def test_token_dtype_selection():
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shards_round_trip_to_text_and_cache(tiny_corpus, tmp_path):
    cfg = data_cfg(tiny_corpus, tmp_path / "cache")
    prep = prepare(cfg, log=lambda _: None)
    assert prep.meta["dtype"] == "uint16"
    tok = prep.tokenizer
    tokens = np.fromfile(prep.split_path("val"), dtype=prep.dtype)
    assert len(tokens) == prep.meta["splits"]["val"]["tokens"]
    eos = prep.meta["eos_id"]
    docs = tok.decode(tokens.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    texts = sorted(p.read_text() for p in tiny_corpus.iterdir())
    assert all(d in texts for d in docs if d)  # every packed document decodes to a source file
    assert tokens[-1] == eos

    # Second prepare: a cache hit (the same directory, untouched).
    stamp = (prep.dir / "meta.json").stat().st_mtime_ns
    again = prepare(cfg, log=lambda _: pytest.fail("re-tokenized a cached corpus"))
    assert again.dir == prep.dir and (again.dir / "meta.json").stat().st_mtime_ns == stamp

    # A changed source invalidates it.
    (tiny_corpus / "doc000.txt").write_text("something else entirely\n" * 5)
    changed = prepare(cfg, log=lambda _: None)
    assert changed.dir != prep.dir
    assert json.loads((changed.dir / "meta.json").read_text())["fingerprint"] != prep.meta["fingerprint"]


def test_no_partial_dataset_left_when_prepare_fails(tiny_corpus, tmp_path, monkeypatch):
    from trainer.data import shards

    def boom(*a, **k):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(shards, "_write_split", boom)
    with pytest.raises(RuntimeError):
        prepare(data_cfg(tiny_corpus, tmp_path / "cache"), log=lambda _: None)
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []


def test_bad_sources_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(data_cfg(tmp_path / "missing.txt", tmp_path), log=lambda _: None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare(data_cfg(tmp_path / "empty", tmp_path), log=lambda _: None)


def test_window_dataset_labels_are_inputs_shifted(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    ds = WindowDataset(path, np.dtype(np.uint16), seq_len=10)
    assert len(ds) == 9
    b = ds.batch(np.array([0, 8]))
    assert b["input_ids"][1].tolist() == list(range(80, 90))
    assert b["labels"][1].tolist() == list(range(81, 91))


@pytest.mark.parametrize("accum", [1, 3])
def test_every_window_seen_once_per_epoch_for_any_dp(accum):
    n, micro = 96, 2
    union = {}
    for dp in (1, 2, 4):
        s = BatchSchedule(n, micro, accum, dp, seed=7)
        steps = n // s.global_batch
        seen = [
            (step, w)
            for step in range(steps)
            for m in range(accum)
            for r in range(dp)
            for w in s.micro_batch(step, m, r).tolist()
        ]
        windows = [w for _, w in seen]
        assert sorted(windows) == list(range(n))  # exactly once
        union[dp] = set(windows)
    assert union[1] == union[2] == union[4]


def test_same_global_batch_means_same_step_contents_in_every_layout():
    n, seed = 120, 3
    layouts = [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)]  # micro, accum, dp: G = 8
    contents = []
    for micro, accum, dp in layouts:
        s = BatchSchedule(n, micro, accum, dp, seed)
        contents.append([
            sorted(w for m in range(accum) for r in range(dp) for w in s.micro_batch(step, m, r).tolist())
            for step in range(40)  # crosses epoch boundaries (15 steps per epoch)
        ])
    assert all(c == contents[0] for c in contents)
    assert contents[0][0] != sorted(range(8))  # shuffled


def test_epochs_are_reshuffled_and_resume_is_a_pure_function_of_step():
    s = BatchSchedule(10, 5, 1, 1, seed=0)
    e0 = np.concatenate([s.micro_batch(0, 0, 0), s.micro_batch(1, 0, 0)])
    e1 = np.concatenate([s.micro_batch(2, 0, 0), s.micro_batch(3, 0, 0)])
    assert sorted(e0) == sorted(e1) == list(range(10)) and not np.array_equal(e0, e1)
    fresh = BatchSchedule(10, 5, 1, 1, seed=0)  # a resumed process: no history
    assert np.array_equal(fresh.micro_batch(3, 0, 0), s.micro_batch(3, 0, 0))


def test_size_cap_and_split_are_independent():
    """A capped corpus still splits in proportion (selection and split use separate hashes)."""
    files = select(list_files("stdlib"), 400_000)
    parts = split(files, 0.1)
    share = sum(f.size for f in parts["val"]) / sum(f.size for f in files)
    assert 0.02 < share < 0.3
