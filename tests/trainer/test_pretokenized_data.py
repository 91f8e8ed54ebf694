"""Corpora another tool tokenized: nanoGPT's ``.bin`` folders and Megatron/GPT-NeoX indexed
datasets (written here from the published format), read into the same shards as text."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.conftest import REPO, TINY, make_corpus, read_metrics, run_cli, sets
from trainer.config import DataConfig
from trainer.data.corpus import name_key
from trainer.data.pretokenized import MEGATRON_MAGIC
from trainer.data.shards import prepare
from trainer.errors import DataError

GPT = str(REPO / "configs/gpt/debug.yaml")


def write_megatron(prefix, docs: list[list[int]], dtype=np.int32, code: int = 4) -> None:
    """An indexed dataset as Megatron-LM's ``IndexedDatasetBuilder`` writes it: one sequence
    per document, ids back to back in ``.bin``; ``.idx``: magic, version 1, dtype code,
    sequence and document counts, lengths (int32), byte offsets (int64), boundaries (int64)."""
    lengths = np.array([len(d) for d in docs], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * np.dtype(dtype).itemsize]).astype(np.int64)
    bounds = np.arange(len(docs) + 1, dtype=np.int64)
    (prefix.parent / f"{prefix.name}.bin").write_bytes(np.concatenate([np.array(d, dtype) for d in docs]).tobytes())
    (prefix.parent / f"{prefix.name}.idx").write_bytes(
        MEGATRON_MAGIC + struct.pack("<QBQQ", 1, code, len(docs), len(bounds))
        + lengths.tobytes() + pointers.tobytes() + bounds.tobytes())


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, cache_dir):
    """A run on text, its prepared shards and tokenizer: the ids other tools would hold."""
    root = tmp_path_factory.mktemp("text")
    corpus = make_corpus(root / "corpus")
    args = [*TINY, f"data.source={corpus}", "train.steps=4", "train.global_batch_size=8"]
    run_cli(["train", GPT, "--run-dir", str(root / "run"), *sets(*args)], cache_dir)
    prep = prepare(DataConfig(source=str(corpus), seq_len=32, cache_dir=str(cache_dir),
                              tokenizer={"kind": "bpe", "vocab_size": 300}), log=lambda _: None)
    return root, args, prep


def test_a_nanogpt_folder_of_the_same_ids_trains_the_same_run(text_run, cache_dir, tmp_path):
    """nanoGPT's layout (uint16 ``train.bin``/``val.bin``) holding exactly the ids the text was
    tokenized into, with its tokenizer: every loss equal."""
    root, args, prep = text_run
    folder = tmp_path / "nanogpt"
    folder.mkdir()
    for split in ("train", "val"):
        np.fromfile(prep.split_path(split), prep.dtype).astype(np.uint16).tofile(folder / f"{split}.bin")
    tok = tmp_path / "tokenizer.json"
    tok.write_text((prep.dir / "tokenizer.json").read_text())
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "run"),
             *sets(*args, f"data.source={folder}", f"data.tokenizer.path={tok}")], cache_dir)
    want, got = read_metrics(root / "run")[0], read_metrics(tmp_path / "run")[0]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_a_megatron_indexed_dataset_is_split_by_document_and_packed_as_written(text_run, cache_dir, tmp_path):
    _, _, prep = text_run
    tok = prep.dir / "tokenizer.json"
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, prep.vocab_size, size=rng.integers(5, 40)).tolist() for _ in range(60)]
    write_megatron(tmp_path / "corpus_text_document", docs)
    cfg = DataConfig(source=str(tmp_path / "corpus_text_document.idx"), cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.2, tokenizer={"path": str(tok)})
    got = prepare(cfg, log=lambda _: None)
    val = [d for i, d in enumerate(docs) if name_key(str(i), "split") < 0.2]
    train = [d for i, d in enumerate(docs) if name_key(str(i), "split") >= 0.2]
    assert val and train
    assert np.fromfile(got.split_path("train"), got.dtype).tolist() == sum(train, [])
    assert np.fromfile(got.split_path("val"), got.dtype).tolist() == sum(val, [])
    assert got.meta["pretokenized"] == "megatron" and got.vocab_size == prep.vocab_size
    # Through the trainer too, named by its prefix.
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, f"data.source={tmp_path / 'corpus_text_document'}", f"data.tokenizer.path={tok}",
        "train.steps=3", "train.global_batch_size=8", "data.val_fraction=0.2")], cache_dir)
    assert len(read_metrics(tmp_path / "run")[0]) == 3


@pytest.mark.parametrize("fault, message", [
    ("header", "not a Megatron indexed dataset index"),
    ("float", "dtype code 7 is not an integer id type"),
    ("id", "token id 5000 at position 3 is outside the vocabulary of data.tokenizer.path (300 ids)"),
    ("no-tokenizer", "holds token ids (megatron): set data.tokenizer.path"),
])
def test_bad_token_sources_are_one_line(fault, message, text_run, cache_dir, tmp_path):
    _, _, prep = text_run
    docs = [[1, 2, 3, 5000 if fault == "id" else 4], [5, 6]]
    write_megatron(tmp_path / "d", docs, *((np.float32, 7) if fault == "float" else ()))
    if fault == "header":
        idx = tmp_path / "d.idx"
        idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:])
    tok = [] if fault == "no-tokenizer" else [f"data.tokenizer.path={prep.dir / 'tokenizer.json'}"]
    p = run_cli(["train", GPT, "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, f"data.source={tmp_path / 'd'}", *tok)], cache_dir, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("seqtrain: error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    with pytest.raises(DataError):
        prepare(DataConfig(source=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"),
                           tokenizer={"path": str(prep.dir / "tokenizer.json")} if tok else {}), log=lambda _: None)


def _ids_parquet(path, rows: list[list[int]]) -> None:
    """A ``datasets`` dataset as ``dataset.map(tokenizer)`` leaves it: ``input_ids`` per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}), path)


def test_a_datasets_input_ids_column_is_split_by_row_and_closed_by_end_of_text(text_run, cache_dir, tmp_path):
    _, _, prep = text_run
    tok, eos = prep.dir / "tokenizer.json", prep.meta["eos_id"]
    rng = np.random.default_rng(1)
    rows = [rng.integers(eos + 2, prep.vocab_size, size=rng.integers(5, 40)).tolist() for _ in range(60)]
    rows[3].append(eos)  # a row that already ends its document keeps one end-of-text
    _ids_parquet(tmp_path / "ids.parquet", rows)
    cfg = DataConfig(source="hf:parquet", hf_data_files=str(tmp_path / "ids.parquet"), val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), tokenizer={"path": str(tok)})
    got = prepare(cfg, log=lambda _: None)
    closed = [r if r[-1] == eos else [*r, eos] for r in rows]
    val = [r for i, r in enumerate(closed) if name_key(f"train:{i}", "split") < 0.2]
    train = [r for i, r in enumerate(closed) if name_key(f"train:{i}", "split") >= 0.2]
    assert val and train and closed[3].count(eos) == 1
    assert np.fromfile(got.split_path("train"), got.dtype).tolist() == sum(train, [])
    assert np.fromfile(got.split_path("val"), got.dtype).tolist() == sum(val, [])
    assert got.meta["pretokenized"] == "datasets-input-ids"
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, "data.source=hf:parquet", f"data.hf_data_files={tmp_path / 'ids.parquet'}",
        f"data.tokenizer.path={tok}", "train.steps=3", "train.global_batch_size=8",
        "data.val_fraction=0.2")], cache_dir)
    assert len(read_metrics(tmp_path / "run")[0]) == 3

    _ids_parquet(tmp_path / "bad.parquet", [[1, 2], [3, 4000, 5]] * 10)
    bad = cfg.model_copy(update={"hf_data_files": str(tmp_path / "bad.parquet")})
    with pytest.raises(DataError, match=r"^data.source='hf:parquet' column 'input_ids': token id 4000 at "
                                        r"position \d+ is outside the vocabulary"):
        prepare(bad, log=lambda _: None)
