"""Sequence-to-sequence data: readers, tokenizers, length buckets under a token budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data.dates import ordinal_words, pairs, words, year_words
from trainer.data.seq2seq import PairBatches, make_buckets, prepare_pairs, read_pairs
from trainer.errors import DataError

PAIRS = [("one two", "1 2"), ("three", "3"), ("four five six", "4 5 6"), ("seven eight", "7 8")]


def test_tsv_jsonl_and_two_aligned_files_read_the_same_pairs(tmp_path):
    (tmp_path / "p.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in PAIRS))
    (tmp_path / "p.src").write_text("".join(s + "\n" for s, _ in PAIRS))
    (tmp_path / "p.tgt").write_text("".join(t + "\n" for _, t in PAIRS))
    assert read_pairs(DataConfig(source=str(tmp_path / "p.tsv"))) == PAIRS
    assert read_pairs(DataConfig(source=str(tmp_path / "p.jsonl"), source_field="src", target_field="tgt")) == PAIRS
    assert read_pairs(DataConfig(source=str(tmp_path / "p.src"), target_source=str(tmp_path / "p.tgt"))) == PAIRS


def test_bad_pair_files_name_the_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 'source<TAB>target'"):
        read_pairs(DataConfig(source=str(tmp_path / "bad.tsv")))
    (tmp_path / "bad.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no 'target' field"):
        read_pairs(DataConfig(source=str(tmp_path / "bad.jsonl")))
    (tmp_path / "a.src").write_text("x\ny\n")
    (tmp_path / "a.tgt").write_text("x\n")
    with pytest.raises(DataError, match="not aligned"):
        read_pairs(DataConfig(source=str(tmp_path / "a.src"), target_source=str(tmp_path / "a.tgt")))


def test_dates_task_words_and_reordering():
    assert words(42) == "forty-two" and ordinal_words(23) == "twenty-third" and ordinal_words(12) == "twelfth"
    assert ordinal_words(30) == "thirtieth"
    import random

    assert year_words(1905, random.Random(0)) == "nineteen oh five"
    data = pairs(500, seed=3)
    assert data == pairs(500, seed=3) and data != pairs(500, seed=4)
    for src, tgt in data:
        y, m, d = tgt.split("-")
        assert len(y) == 4 and 1900 <= int(y) <= 2099 and 1 <= int(m) <= 12 and 1 <= int(d) <= 31
        assert src != tgt


@pytest.mark.parametrize("shared", [True, False])
def test_prepared_pairs_round_trip_with_shared_or_separate_vocabularies(tmp_path, shared):
    cfg = DataConfig(source="dates", num_pairs=300, cache_dir=str(tmp_path), shared_vocab=shared,
                     tokenizer={"kind": "char", "vocab_size": 64})
    prep = prepare_pairs(cfg, seed=0, log=lambda _: None)
    assert prep.meta["shared_vocab"] == shared
    src_tok, tgt_tok = prep.tokenizer("src"), prep.tokenizer("tgt")
    if not shared:
        assert src_tok.get_vocab_size() > tgt_tok.get_vocab_size()  # ISO dates use few characters
    split = prep.split("train")
    train_pairs = [p for i, p in enumerate(pairs(300, 0))]
    decoded = {(src_tok.decode(split.src(i).tolist()), tgt_tok.decode(split.tgt(i).tolist())) for i in range(len(split))}
    assert decoded <= set(train_pairs) and len(split) + len(prep.split("val")) == 300
    assert prepare_pairs(cfg, seed=0, log=lambda _: pytest.fail("cache miss")).dir == prep.dir


def test_buckets_respect_the_token_budget_and_cover_each_pair_once(tmp_path):
    cfg = DataConfig(source="dates", num_pairs=400, cache_dir=str(tmp_path), tokenizer={"kind": "char", "vocab_size": 64})
    prep = prepare_pairs(cfg, seed=0, log=lambda _: None)
    split = prep.split("train")
    buckets, dropped = make_buckets(split, max_len=48, micro_batch=1000, max_tokens=300, seed=1)
    src_len, tgt_len = split.lengths()
    longest = np.maximum(src_len, tgt_len + 1)
    assert dropped == int((longest > 48).sum())
    seen = np.concatenate(buckets)
    assert sorted(seen.tolist()) == sorted(np.flatnonzero(longest <= 48).tolist())
    for b in buckets:
        assert longest[b].max() * len(b) <= 300 or len(b) == 1
    # Length sorting keeps padding low: the mean padded fraction stays small.
    padded = sum(longest[b].max() * len(b) for b in buckets)
    assert longest[seen].sum() / padded > 0.85

    pb = PairBatches(split, buckets, accum=2, dp=2, pad_id=1, bos_id=0, eos_id=0, seed=0)
    batch = pb.micro_batch(0, 1, 1)
    assert batch["tgt_in"][:, 0].eq(0).all()
    lab, tin = batch["labels"], batch["tgt_in"]
    real = lab != -100
    assert (tin[:, 1:][real[:, :-1]] == lab[:, :-1][real[:, :-1]]).all()  # labels are tgt_in shifted
    # Every layout with the same global number of micro-batches per step reads the same buckets.
    one = PairBatches(split, buckets, accum=4, dp=1, pad_id=1, bos_id=0, eos_id=0, seed=0)
    a = sorted(tuple(pb.micro_batch(3, m, r)["src"].flatten().tolist()) for m in range(2) for r in range(2))
    b = sorted(tuple(one.micro_batch(3, m, 0)["src"].flatten().tolist()) for m in range(4))
    assert a == b


def test_official_validation_and_test_files_are_those_splits_and_all_of_source_trains(tmp_path):
    """Any pair format for each split; the hash slice is not taken from source then; BPE on
    both sides decodes back to the exact text (what sacrebleu scores)."""
    from trainer.data.seq2seq import read_splits

    train = [(f"message number {i}: cannot open '%s'", f"Nachricht Nummer {i}: »%s« kann nicht geöffnet werden")
             for i in range(60)]
    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in train))
    (tmp_path / "train.de").write_text("".join(t + "\n" for _, t in train))
    (tmp_path / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS[:2]))
    cfg = DataConfig(source=str(tmp_path / "train.en"), target_source=str(tmp_path / "train.de"),
                     val_source=str(tmp_path / "valid.tsv"), test_source=str(tmp_path / "test.jsonl"),
                     cache_dir=str(tmp_path / "cache"), shared_vocab=False, tokenizer={"vocab_size": 300})
    splits = read_splits(cfg)
    assert splits == {"train": train, "val": PAIRS, "test": PAIRS[:2]}
    prep = prepare_pairs(cfg, seed=0, log=lambda _: None)
    assert {k: v["pairs"] for k, v in prep.meta["splits"].items()} == {"train": 60, "val": 4, "test": 2}
    src_tok, tgt_tok = prep.tokenizer("src"), prep.tokenizer("tgt")
    tr = prep.split("train")
    assert [(src_tok.decode(tr.src(i).tolist()), tgt_tok.decode(tr.tgt(i).tolist())) for i in range(60)] == train
    assert len(tr.tgt(0)) < len(train[0][1]) / 2  # subwords, not characters


def test_misaligned_validation_files_and_a_target_without_source_are_one_line_errors(tmp_path):
    from trainer.config import load_config
    from trainer.data.seq2seq import read_splits
    from trainer.errors import ConfigError

    (tmp_path / "v.en").write_text("a\nb\nc\n")
    (tmp_path / "v.de").write_text("x\ny\n")
    cfg = DataConfig(source="dates", num_pairs=50, val_source=str(tmp_path / "v.en"),
                     val_target_source=str(tmp_path / "v.de"))
    with pytest.raises(DataError, match=r"^data.val_source: .*v.en has 3 lines but data.val_target_source .*v.de "
                                        r"has 2: not aligned$"):
        read_splits(cfg)
    with pytest.raises(ConfigError, match="data.test_target_source needs data.test_source"):
        load_config(None, ["model.family=encdec", "data.source=dates", "data.test_target_source=x.de"])
    with pytest.raises(ConfigError, match="data.val_source is for sequence-to-sequence families, not gpt"):
        load_config(None, ["data.val_source=v.tsv"])


def test_system_messages_are_real_translations_split_by_a_hash_of_the_english(tmp_path):
    from trainer.data import system_messages
    from trainer.data.seq2seq import read_splits

    if not list(system_messages.CATALOGUES.glob("*.mo")):
        pytest.skip("no German gettext catalogues on this machine")
    splits = read_splits(DataConfig(source="system-messages", val_fraction=0.05))
    n = sum(map(len, splits.values()))
    assert n > 10_000 and 0.03 < len(splits["val"]) / n < 0.07 and 0.03 < len(splits["test"]) / n < 0.07
    english = [s for p in splits.values() for s, _ in p]
    assert len(set(english)) == n  # one translation per English message, no pair in two splits
    assert all("\n" not in s + t and "\t" not in s + t and s != t for p in splits.values() for s, t in p)
    assert read_splits(DataConfig(source="system-messages", val_fraction=0.05)) == splits  # stable
