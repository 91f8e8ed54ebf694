"""Sharded construction: a rank materialises only what it keeps, with the single-device numbers."""

from __future__ import annotations

import json

import pytest
import torch

import models
from tests.conftest import REPO, TINY, run_cli, sets
from trainer.config import load_config
from trainer.parallel.materialize import initial_values, materialize


@pytest.mark.parametrize("preset, vocab", [("gpt/debug.yaml", {"vocab_size": 300}),
                                           ("encdec/debug.yaml", {"src_vocab_size": 300, "tgt_vocab_size": 200})])
def test_meta_build_materialises_the_single_device_numbers(preset, vocab):
    cfg = load_config(REPO / "configs" / preset).model.model_copy(update=vocab)
    whole = models.build(cfg, seed=3)
    with torch.device("meta"):
        model = models.build(cfg, seed=3)
    materialize(model, initial_values(model), torch.device("cpu"))
    got, want = model.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k, b in whole.named_buffers():  # computed buffers too (the encoder-decoder's positions)
        assert torch.equal(dict(model.named_buffers())[k], b), k
    if cfg.family == "gpt":
        assert model.lm_head.weight is model.wte.weight  # still tied


# 85 M parameters: large enough that the model dwarfs the noise in a process's resident set.
MID = [*TINY, "model.n_layer=12", "model.n_head=12", "model.d_model=768", "parallel.vocab_multiple=64",
       "train.micro_batch_size=1", "train.steps=1", "train.warmup_steps=1"]


def _init_growth(tmp_path, cache_dir, corpus, name: str, nproc: int, extra: list[str]) -> list[float]:
    """Each rank's ``init_peak_mb - baseline_mb``: what building its part of the model took."""
    run = tmp_path / name
    args = [*MID, f"data.source={corpus}", f"train.global_batch_size={nproc}", *extra]
    run_cli(["train", str(REPO / "configs/gpt/debug.yaml"), "--run-dir", str(run), *sets(*args)],
            cache_dir, nproc=nproc)
    return [r["init_peak_mb"] - r["baseline_mb"] for r in json.loads((run / "memory.json").read_text())]


@pytest.mark.distributed
def test_a_rank_never_holds_the_whole_model(tmp_path, cache_dir, tiny_corpus):
    (single,) = _init_growth(tmp_path, cache_dir, tiny_corpus, "single", 1, [])
    assert single > 300  # 340 MB of fp32 parameters
    zero3 = _init_growth(tmp_path, cache_dir, tiny_corpus, "dp4-zero3", 4, ["parallel.zero_stage=3"])
    tp_pp = _init_growth(tmp_path, cache_dir, tiny_corpus, "tp2xpp2", 4, ["parallel.tp=2", "parallel.pp=2"])
    print(f"init growth MB: single {single:.0f}, dp4 ZeRO-3 {zero3}, tp2xpp2 {tp_pp}")  # pytest -s
    assert max(zero3) <= 0.4 * single  # a quarter of the model, one whole parameter at a time
    assert max(tp_pp) <= 0.5 * single  # a quarter (half the blocks, half of each) and one whole layer
    # Data parallelism keeps the whole model, but made straight in the training precision on
    # the device: bf16 never passes through a whole fp32 copy (built whole, it was 1.0).
    dp2 = _init_growth(tmp_path, cache_dir, tiny_corpus, "dp2-zero1-bf16", 2,
                       ["parallel.zero_stage=1", "train.precision=bf16"])
    print(f"dp2 ZeRO-1 bf16 {dp2}")
    assert max(dp2) <= 0.6 * single  # half (2 bytes a parameter) and one whole parameter


@pytest.mark.distributed
def test_init_from_is_read_one_tensor_at_a_time_into_each_layout(tmp_path, cache_dir, tiny_corpus):
    """``train.init_from`` under ZeRO-3 and tensor parallelism (sharded construction) starts
    from the same weights as one process: the same losses."""
    from tests.conftest import read_metrics

    args = [*TINY, "parallel.vocab_multiple=64", "train.micro_batch_size=2", "train.global_batch_size=4",
            f"data.source={tiny_corpus}"]
    gpt = str(REPO / "configs/gpt/debug.yaml")
    # The source is a tensor-parallel checkpoint: read through memory-mapped rank files, one
    # whole tensor concatenated at a time.
    run_cli(["train", gpt, "--run-dir", str(tmp_path / "src"), *sets(*args, "train.steps=3", "parallel.tp=2")],
            cache_dir, nproc=2)
    start = [*args, "train.steps=3", "train.seed=5", f"train.init_from={tmp_path / 'src'}"]
    losses = {}
    for name, nproc, extra in (("one", 1, []), ("zero3", 2, ["parallel.zero_stage=3"]), ("tp2", 2, ["parallel.tp=2"])):
        run_cli(["train", gpt, "--run-dir", str(tmp_path / name), *sets(*start, *extra)], cache_dir, nproc=nproc)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name)[0]]
    src = [r["loss"] for r in read_metrics(tmp_path / "src")[0]]
    assert losses["one"][0] < src[0] - 0.3  # it did start from the trained weights
    for name in ("zero3", "tp2"):
        assert losses[name] == pytest.approx(losses["one"], abs=1e-5), name
