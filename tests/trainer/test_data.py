"""Data path: corpus split, packed shards and their cache, the batch schedule's invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data import BatchSchedule, WindowDataset, prepare
from trainer.data.corpus import Corpus
from trainer.data.shards import token_dtype
from trainer.errors import DataError


def data_cfg(source, cache, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(source=str(source), cache_dir=str(cache), seq_len=16,
                      tokenizer={"vocab_size": kw.pop("vocab_size", 300), "kind": kw.pop("kind", "bpe")}, **kw)


def test_stdlib_corpus_is_capped_split_by_name_and_deterministic(tmp_path):
    cfg = DataConfig(source="stdlib", max_bytes=2_000_000, val_fraction=0.1)
    docs = list(Corpus(cfg).documents())
    size = sum(len(t.encode()) for _, t in docs)
    assert 1_000_000 < size <= 2_000_000
    assert all(n.endswith(".py") and not n.startswith(("encodings/", "site-packages/")) for n, _ in docs)
    assert docs == list(Corpus(cfg).documents())
    train, val = list(Corpus(cfg).texts("train")), list(Corpus(cfg).texts("val"))
    assert len(train) + len(val) == len(docs) and val and train
    # A capped corpus still splits in proportion (selection and split use separate hashes).
    assert 0.02 < sum(map(len, val)) / sum(len(t) for _, t in docs) < 0.3


def test_stdlib_listing_prunes_excluded_folders_and_lists_what_a_full_walk_finds():
    """The pruned walk (it runs at every start) finds exactly the files of a full recursive glob
    filtered afterwards: the corpus, and so the data cache's key, are unchanged."""
    from trainer.data.corpus import STDLIB_EXCLUDE, _stat, _stdlib_files, stdlib_root

    root = stdlib_root()
    full = [_stat(str(p.relative_to(root)), p) for p in root.rglob("*.py")
            if not STDLIB_EXCLUDE & set(p.relative_to(root).parts)]
    by_name = lambda f: f.name  # noqa: E731
    assert sorted(_stdlib_files(root), key=by_name) == sorted(full, key=by_name) and len(full) > 500


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
    assert tokens[-1] == eos and not prep.meta.get("val_from_train_tail")

    # Second prepare: a cache hit (the same directory, untouched).
    stamp = (prep.dir / "meta.json").stat().st_mtime_ns
    again = prepare(cfg, log=lambda _: pytest.fail("re-tokenized a cached corpus"))
    assert again.dir == prep.dir and (again.dir / "meta.json").stat().st_mtime_ns == stamp

    # A changed source invalidates it.
    (tiny_corpus / "doc000.txt").write_text("something else entirely\n" * 5)
    changed = prepare(cfg, log=lambda _: None)
    assert changed.dir != prep.dir
    assert json.loads((changed.dir / "meta.json").read_text())["fingerprint"] != prep.meta["fingerprint"]


def test_a_failed_prepare_leaves_nothing_complete_and_resumes_at_the_first_missing_shard(tiny_corpus, tmp_path,
                                                                                       monkeypatch):
    from trainer.data import shards

    cfg = data_cfg(tiny_corpus, tmp_path / "cache", shard_bytes=4000)  # 40 files of ~1.3 KB: 8 units
    real, calls = shards.encode_documents, []

    def dies_at_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed mid-write")
        return real(*a, **k)

    monkeypatch.setattr(shards, "encode_documents", dies_at_the_fourth)
    with pytest.raises(RuntimeError):
        prepare(cfg, log=lambda _: None)
    entries = list((tmp_path / "cache" / "datasets").iterdir())
    assert [e.name.startswith(".") and e.name.endswith(".partial") for e in entries] == [True]
    assert sorted(f.name for f in entries[0].glob("*.json")) == ["00000.json", "00001.json", "00002.json",
                                                                  "tokenizer.json"]
    monkeypatch.setattr(shards, "encode_documents", real)
    said = []
    resumed = prepare(cfg, log=said.append)
    assert said[0] == f"resuming: 3 of 8 shards of {tiny_corpus} already written"
    straight = prepare(data_cfg(tiny_corpus, tmp_path / "other", shard_bytes=4000), log=lambda _: None)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (resumed.dir / name).read_bytes() == (straight.dir / name).read_bytes(), name
    assert [e.name for e in (tmp_path / "cache" / "datasets").iterdir()] == [resumed.dir.name]


def test_killed_prepare_leaves_nothing_that_looks_complete(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, cli_env

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "trainer", "data", "prepare", str(REPO / "configs/gpt/debug.yaml"),
           "--set", "data.max_bytes=null"]
    proc = subprocess.Popen(cmd, env=cli_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    datasets = cache / "datasets"
    deadline = time.time() + 60
    while time.time() < deadline and not (datasets.is_dir() and any(datasets.iterdir())):
        time.sleep(0.05)
    time.sleep(0.5)  # inside tokenizer training / encoding of the 20+ MB corpus
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = list(datasets.iterdir())
    assert entries and all(e.name.startswith(".") for e in entries)  # only a staging directory
    assert not any((e / "meta.json").exists() for e in entries)


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


@pytest.mark.parametrize("table_max", [1 << 24, 0], ids=["table", "bijection"])
@pytest.mark.parametrize("accum", [1, 3])
def test_every_window_seen_once_per_epoch_for_any_dp(accum, table_max):
    n, micro = 96, 2
    union = {}
    for dp in (1, 2, 4):
        s = BatchSchedule(n, micro, accum, dp, seed=7, table_max=table_max)
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


@pytest.mark.parametrize("table_max", [1 << 24, 0], ids=["table", "bijection"])
def test_same_global_batch_means_same_step_contents_in_every_layout(table_max):
    n, seed = 120, 3
    layouts = [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)]  # micro, accum, dp: G = 8
    contents = []
    for micro, accum, dp in layouts:
        s = BatchSchedule(n, micro, accum, dp, seed, table_max=table_max)
        contents.append([
            sorted(w for m in range(accum) for r in range(dp) for w in s.micro_batch(step, m, r).tolist())
            for step in range(40)  # crosses epoch boundaries (15 steps per epoch)
        ])
    assert all(c == contents[0] for c in contents)
    assert contents[0][0] != sorted(range(8))  # shuffled


@pytest.mark.parametrize("table_max", [1 << 24, 0], ids=["table", "bijection"])
def test_epochs_are_reshuffled_and_resume_is_a_pure_function_of_step(table_max):
    s = BatchSchedule(10, 5, 1, 1, seed=0, table_max=table_max)
    e0 = np.concatenate([s.micro_batch(0, 0, 0), s.micro_batch(1, 0, 0)])
    e1 = np.concatenate([s.micro_batch(2, 0, 0), s.micro_batch(3, 0, 0)])
    assert sorted(e0) == sorted(e1) == list(range(10)) and not np.array_equal(e0, e1)
    fresh = BatchSchedule(10, 5, 1, 1, seed=0, table_max=table_max)  # a resumed process: no history
    assert np.array_equal(fresh.micro_batch(3, 0, 0), s.micro_batch(3, 0, 0))



def test_random_starts_are_the_same_sequences_in_every_layout_and_any_position(tmp_path):
    """data.sampling=random: a step's windows depend on (seed, step) only, start anywhere (not
    only at multiples of seq_len), fit in the stream, and differ from step to step."""
    from trainer.data.sampler import LMBatches, RandomStarts

    n_tokens, seq = 1000, 16
    layouts = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4)]  # micro, accum, dp: G = 8
    contents = []
    for micro, accum, dp in layouts:
        s = RandomStarts(n_tokens, seq, micro, accum, dp, seed=5)
        contents.append([sorted(int(x) for m in range(accum) for r in range(dp) for x in s.micro_batch(step, m, r))
                         for step in range(30)])
    assert all(c == contents[0] for c in contents)
    starts = [x for step in contents[0] for x in step]
    assert min(starts) >= 0 and max(starts) <= n_tokens - seq - 1
    assert any(x % seq for x in starts) and contents[0][0] != contents[0][1]
    assert contents[0] != [sorted(RandomStarts(n_tokens, seq, 8, 1, 1, seed=6).micro_batch(k, 0, 0).tolist())
                           for k in range(30)]  # the seed matters
    # The batches hold the windows at those starts, labels shifted by one.
    tokens = np.arange(n_tokens, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    b = LMBatches(WindowDataset(tmp_path / "t.bin", np.dtype(np.uint16), seq), 4, 2, 1, 5, "random")
    batch = b.micro_batch(7, 1, 0)
    first = RandomStarts(n_tokens, seq, 4, 2, 1, seed=5).micro_batch(7, 1, 0)
    assert batch["input_ids"][:, 0].tolist() == first.tolist()
    assert (batch["labels"] == batch["input_ids"] + 1).all()


def test_random_sampling_is_refused_where_order_matters():
    from trainer.config import load_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="data.sampling=random is for language models"):
        load_config("configs/rnn/lstm-lm-debug.yaml", ["data.tbptt=true", "data.sampling=random"])


def test_single_document_holds_out_the_tail_for_validation(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    prep = prepare(data_cfg(tmp_path / "one.txt", tmp_path / "cache", val_fraction=0.1), log=lambda _: None)
    assert prep.meta["val_from_train_tail"]
    train = np.fromfile(prep.split_path("train"), dtype=prep.dtype).tolist()
    val = np.fromfile(prep.split_path("val"), dtype=prep.dtype).tolist()
    assert len(val) == int(0.1 * (len(train) + len(val)))
    assert prep.tokenizer.decode(train + val) == text  # the stream, cut in two, nothing lost


def test_char_tokenizer_round_trips_and_maps_rare_characters_to_unk(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(20):
        (tmp_path / "c" / f"{i}.txt").write_text("hello world\n" * (i + 1) + ("é" if i == 0 else ""))
    prep = prepare(data_cfg(tmp_path / "c", tmp_path / "cache", kind="char", vocab_size=12), log=lambda _: None)
    tok = prep.tokenizer
    assert tok.get_vocab_size() == 12  # 3 specials + the 9 characters of "hello world\n"
    enc = tok.encode("hello\nworld")
    assert len(enc.ids) == 11 and tok.decode(enc.ids) == "hello\nworld"
    assert tok.encode("é").ids == [tok.token_to_id("<|unk|>")]


def test_existing_tokenizer_is_used_and_large_vocab_gets_uint32(tiny_corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|unk|>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    words = sorted({w for p in tiny_corpus.iterdir() for w in p.read_text().split()})
    vocab.update({w: 70_002 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "hf-tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    cfg = data_cfg(tiny_corpus, tmp_path / "cache")
    cfg.tokenizer.path = str(folder)
    prep = prepare(cfg, log=lambda _: None)
    assert prep.meta["dtype"] == "uint32" and prep.vocab_size == len(vocab)
    ids = np.fromfile(prep.split_path("train"), dtype=np.uint32)
    assert ids.max() >= 70_002  # ids above 65535 survive the round trip
    first_doc = ids[: list(ids).index(0)].tolist()
    assert prep.tokenizer.decode(first_doc).split() == Corpus(cfg).texts("train").__next__().split()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_and_parquet_read_directly_and_through_datasets_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"document number {i} says {'ab' * i}", "id": i} for i in range(30)]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    texts = [r["text"] for r in rows]
    for source, extra in [
        (str(tmp_path / "d.jsonl"), {}),
        (str(tmp_path / "d.parquet"), {}),
        ("hf:json", {"hf_data_files": str(tmp_path / "d.jsonl")}),
        ("hf:parquet", {"hf_data_files": str(tmp_path / "d.parquet")}),
        ("hf:json", {"hf_data_files": str(tmp_path / "d.jsonl"), "streaming": True}),
    ]:
        cfg = DataConfig(source=source, cache_dir=str(tmp_path / "cache"), **extra)
        assert [t for _, t in Corpus(cfg).documents()] == texts, source
    cfg = DataConfig(source="hf:json", hf_data_files=str(tmp_path / "d.jsonl"),
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.2, tokenizer={"vocab_size": 300})
    prep = prepare(cfg, log=lambda _: None)
    assert prep.meta["splits"]["train"]["tokens"] > 0 and prep.meta["splits"]["val"]["tokens"] > 0
    assert prepare(cfg, log=lambda _: pytest.fail("cache miss")).dir == prep.dir


def test_bad_records_name_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"a.jsonl:2: no 'text' field \(set data.text_field\)"):
        list(Corpus(DataConfig(source=str(tmp_path / "a.jsonl"))).documents())
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid JSON"):
        list(Corpus(DataConfig(source=str(tmp_path / "b.jsonl"))).documents())
    with pytest.raises(DataError, match="no 'content' column"):
        list(Corpus(DataConfig(source="hf:json", hf_data_files=str(tmp_path / "a.jsonl"),
                               text_field="content")).documents())


def test_invalid_utf8_policy(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    ok = [t for _, t in Corpus(DataConfig(source=str(tmp_path / "bad.txt"))).documents()]
    assert ok == ["caf\ufffd au lait\n"]
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 3 \(set data.invalid_utf8=replace"):
        list(Corpus(DataConfig(source=str(tmp_path / "bad.txt"), invalid_utf8="fail")).documents())
    cfg = data_cfg(tmp_path / "bad.txt", tmp_path / "cache", invalid_utf8="fail")
    with pytest.raises(DataError):
        prepare(cfg, log=lambda _: None)
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == []  # nothing half-written


def test_a_single_document_always_trains_whatever_its_name_hashes_to(tmp_path):
    """One text file is the most common corpus: whether its name hashes to validation must not
    matter (at val_fraction 0.45 about half of all names do)."""
    from trainer.data.corpus import name_key

    text = "".join(f"line {i}: the quick brown fox\n" for i in range(100))
    names = [f"corpus{i}.txt" for i in range(24)]
    assert any(name_key(n, "split") < 0.45 for n in names)  # some of them do hash to validation
    for n in names:
        (tmp_path / n).write_text(text)
        cfg = data_cfg(tmp_path / n, tmp_path / "cache", val_fraction=0.45, kind="char", vocab_size=64)
        prep = prepare(cfg, log=lambda _: None)
        assert prep.meta["val_from_train_tail"], n
        train = np.fromfile(prep.split_path("train"), dtype=prep.dtype).tolist()
        val = np.fromfile(prep.split_path("val"), dtype=prep.dtype).tolist()
        assert len(train) > len(val) > 0 and prep.tokenizer.decode(train + val) == text, n


def test_an_unreachable_hub_dataset_is_one_line_with_the_offline_hint(cache_dir, tmp_path):
    from tests.conftest import REPO, run_cli

    p = run_cli(["data", "prepare", str(REPO / "configs/gpt/debug.yaml"), "--set", "data.source=hf:nobody-xyz/no-such-set"],
                cache_dir, check=False, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "data.source='hf:nobody-xyz/no-such-set': cannot reach the dataset" in lines[0]
    assert "offline node" in lines[0]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 96, 1000, 12345, 2**20 + 1])
def test_index_permutation_is_a_bijection_that_shuffles_like_a_random_one(n):
    """Every window once per epoch, for sizes at and past powers of four (cycle-walking); the
    mean distance a window moves is a uniform shuffle's (n/3), and other seeds give other orders."""
    from trainer.data.sampler import IndexPermutation

    perms = [IndexPermutation(n, [seed, 0])(np.arange(n)) for seed in range(8)]
    assert all(sorted(p.tolist()) == list(range(n)) for p in perms)
    if n >= 96:
        moved = np.mean([np.abs(p - np.arange(n)).mean() for p in perms]) / (n / 3)
        assert 0.9 < moved < 1.1, moved
        assert len({p.tobytes() for p in perms}) == len(perms)


def test_the_schedule_holds_no_table_of_windows():
    """500 M windows (a 1 T-token corpus at sequence 2048): a micro-batch's windows cost a few
    kilobytes, where a permutation table would be 4 GB of int64 per rank."""
    import tracemalloc

    s = BatchSchedule(500_000_000, 8, 4, 8, seed=1)
    s.micro_batch(0, 0, 0)  # numpy's seeding machinery allocates once, on first use
    tracemalloc.start()
    got = [s.micro_batch(step, m, r) for step in (0, 1_000_000) for m in range(4) for r in range(8)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024, peak
    flat = np.concatenate(got)
    assert len(np.unique(flat)) == len(flat) and flat.max() < 500_000_000


def test_document_mask_batches_name_each_tokens_document_and_predict_no_first_token(tmp_path):
    """data.document_mask: an end-of-text token belongs to the document it ends; the token
    after it starts the next document and is not a target."""
    from trainer.data.sampler import LMBatches

    eos = 0
    stream = np.array([5, 6, eos, 7, 8, 9, eos, 4, 3, 2, 1], dtype=np.uint16)
    stream.tofile(tmp_path / "t.bin")
    data = WindowDataset(tmp_path / "t.bin", np.uint16, seq_len=10)
    b = next(LMBatches(data, 1, 1, 1, seed=0, document_eos=eos).eval_batches(0, 1, 1))
    assert b["input_ids"][0].tolist() == [5, 6, 0, 7, 8, 9, 0, 4, 3, 2]
    assert b["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert b["labels"][0].tolist() == [6, 0, -100, 8, 9, 0, -100, 3, 2, 1]
    plain = next(LMBatches(data, 1, 1, 1, seed=0).eval_batches(0, 1, 1))
    assert "document_ids" not in plain and plain["labels"][0].tolist()[2] == 7


def test_a_tokenizer_learns_from_a_bounded_deterministic_sample(tiny_corpus, tmp_path):
    """``data.tokenizer.train_bytes``: the first bytes of the training documents, in corpus order
    (the last cut to fit): the same tokenizer as one trained on exactly that text."""
    from trainer.data.tokenizer import sample, train_tokenizer

    texts = ["ab" * 10, "cdé" * 10, "xyz" * 10]
    assert list(sample(texts, 25)) == ["ab" * 10, "cdéc"]  # 20 bytes, then 5 more (é is 2)
    assert list(sample(texts, 23)) == ["ab" * 10, "cd"]  # never half a character
    assert sum(len(t.encode()) for t in sample(texts, 1000)) == 20 + 40 + 30
    budget = 3000
    cfg = DataConfig(source=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                     tokenizer={"vocab_size": 300, "train_bytes": budget})
    got = prepare(cfg, log=lambda _: None).tokenizer
    want = train_tokenizer("bpe", sample(Corpus(cfg).texts("train"), budget), 300)
    assert got.to_str() == want.to_str()
    whole = prepare(data_cfg(tiny_corpus, tmp_path / "whole"), log=lambda _: None).tokenizer
    assert whole.to_str() != got.to_str()  # the bound changed what it learned
