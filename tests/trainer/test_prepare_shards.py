"""Preparation in units of work: the tokens never depend on how the work is split (one unit,
many units over worker processes, parts run one after another as nodes would), and equal the
documents encoded one by one in corpus order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, make_corpus, run_cli, sets
from trainer.config import DataConfig
from trainer.data.corpus import Corpus, name_key
from trainer.data.shards import prepare
from trainer.data.tokenizer import EOS

SPLITS = ("train.bin", "val.bin", "tokenizer.json")


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Text files, a JSONL file large enough to be cut at line ends, and a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_corpus(tmp_path_factory.mktemp("mixed") / "corpus", n_docs=12)
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta"]
    with open(root / "rows.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))}) + "\n")
            if rng.random() < 0.05:
                f.write("\n")  # blank lines are skipped, and still counted in the line names
    pq.write_table(pa.table({"text": [" ".join(rng.choice(words) for _ in range(9)) for _ in range(60)]}),
                   root / "table.parquet")
    return root


def _cfg(source, cache, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(cache), val_fraction=0.2,
                      tokenizer={"vocab_size": 300}, **kw)


def _reference(cfg: DataConfig, prep) -> dict[str, list[int]]:
    """Each document of ``Corpus.documents()`` (the one sequential reader) encoded on its own."""
    tok, eos = prep.tokenizer, prep.tokenizer.token_to_id(EOS)
    out = {"train": [], "val": []}
    for name, text in Corpus(cfg).documents():
        split = "val" if name_key(name, "split") < cfg.val_fraction else "train"
        out[split] += [*tok.encode(text, add_special_tokens=False).ids, eos]
    return out


def test_the_tokens_do_not_depend_on_how_the_work_is_split(mixed_corpus, tmp_path):
    whole = prepare(_cfg(mixed_corpus, tmp_path / "one"), log=lambda _: None)
    assert whole.meta["shards"] == 1
    want = _reference(_cfg(mixed_corpus, tmp_path / "one"), whole)
    for split in ("train", "val"):
        assert np.fromfile(whole.split_path(split), whole.dtype).tolist() == want[split]

    small = _cfg(mixed_corpus, tmp_path / "workers", shard_bytes=3000)
    assert len(Corpus(small).units(3000)) > 8
    assert any(p.file.name == "rows.jsonl" and p.start > 0 for u in Corpus(small).units(3000) for p in u)
    spread = prepare(small, log=lambda _: None, workers=2)

    parts = _cfg(mixed_corpus, tmp_path / "parts", shard_bytes=3000)
    said: list[str] = []
    assert prepare(parts, log=said.append, part=(0, 3)) is None
    assert prepare(parts, log=said.append, part=(2, 3)) is None
    assert "part 2/3 wrote its" in said[-1] and "still to come from the other parts" in said[-1]
    last = prepare(parts, log=lambda _: None, part=(1, 3))
    for got in (spread, last):
        assert got.meta["shards"] > 8
        for name in SPLITS:
            assert (got.dir / name).read_bytes() == (whole.dir / name).read_bytes(), (got.dir, name)


def test_a_datasets_source_is_cut_into_row_ranges_with_the_same_tokens(mixed_corpus, tmp_path):
    source = dict(source="hf:json", hf_data_files=str(mixed_corpus / "rows.jsonl"))
    whole = prepare(DataConfig(**source, cache_dir=str(tmp_path / "a"), tokenizer={"vocab_size": 300}),
                    log=lambda _: None)
    cut = prepare(DataConfig(**source, cache_dir=str(tmp_path / "b"), tokenizer={"vocab_size": 300},
                             shard_bytes=2000), log=lambda _: None, workers=2)
    assert whole.meta["shards"] == 1 and cut.meta["shards"] > 4
    for name in SPLITS:
        assert (cut.dir / name).read_bytes() == (whole.dir / name).read_bytes(), name


def test_prepare_options_are_checked_in_one_line(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    for flags, message in ((["--part", "3/3"], "--part '3/3': give i/n with 0 <= i < n"),
                           (["--part", "x"], "--part 'x': give i/n"),
                           (["--workers", "0"], "--workers 0: give at least 1")):
        p = run_cli(["data", "prepare", str(REPO / "configs/gpt/debug.yaml"), *flags,
                     *sets(f"data.source={corpus}")], tmp_path / "cache", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"seqtrain: error: {message}"), p.stderr


def test_preparations_of_one_corpus_started_together_all_get_the_dataset(mixed_corpus, tmp_path):
    """Four ``seqtrain data prepare`` at once on one cache (the first rank of four nodes, or an
    array's tasks): the first to publish removes the shared work directory under the others;
    each returns the same dataset, and nothing half-made is left."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    cmd = [sys.executable, "-m", "trainer", "data", "prepare", str(REPO / "configs/gpt/debug.yaml"),
           *sets(f"data.source={mixed_corpus}", "data.max_bytes=null", "data.shard_bytes=2000",
                 "data.tokenizer.vocab_size=300")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=cli_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 4, [err[-2000:] for _, _, err in results]
    dirs = {out.strip().splitlines()[-1].split(":")[0] for _, out, _ in results}
    assert len(dirs) == 1
    assert [e.name for e in (tmp_path / "cache" / "datasets").iterdir()] == [Path(dirs.pop()).name]
