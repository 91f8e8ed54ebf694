"""The benchmark harness: the plain loop it compares against trains the same model the same way."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY, run_cli, sets

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_bench_engine_and_plain_loop_agree_and_report_every_phase(tiny_corpus, cache_dir):
    overrides = [*TINY, f"data.source={tiny_corpus}", "train.global_batch_size=8"]
    out = run_cli(["bench", PRESET, "--steps", "6", "--warmup", "2", "--repeat", "2", "--json",
                   *sets(*overrides), "--plain-set", "train.optimizer_impl=foreach"], cache_dir)
    r = json.loads(out.stdout)
    engine, plain = r["engine"], r["plain"]
    assert "train.optimizer_impl=foreach" in plain["overrides"]
    assert "train.optimizer_impl=foreach" not in engine["overrides"]
    # Same model, data, optimizer arithmetic (fused vs foreach kernel), clipping and schedule:
    # the same losses, engine or not.
    assert engine["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-5)
    for v in (engine, plain):
        assert len(v["all_tokens_per_s"]) == 2 and v["tokens_per_s"] == max(v["all_tokens_per_s"])
        assert min(v["all_tokens_per_s"]) <= v["median_tokens_per_s"] <= v["tokens_per_s"]
    assert engine["paired_vs_engine"] == [1.0, 1.0]
    pairs = [e / p for e, p in zip(engine["all_tokens_per_s"], plain["all_tokens_per_s"], strict=True)]
    assert r["engine_overhead_paired"] == pytest.approx([1 - x for x in pairs])
    for v in (engine, plain):
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 1 and v["peak_memory_mb"] > 100
        assert set(v["ms_per_step"]) == {"data", "forward", "backward", "optimizer", "communication"}
        assert v["flops_per_token"] > v["flops_per_token_6n"] * 0.5
    assert engine["peak_flops"] == plain["peak_flops"]  # one probe shared by both
    assert r["engine_overhead"] == pytest.approx(1 - engine["tokens_per_s"] / plain["tokens_per_s"])


def test_bench_bf16_plain_loop_uses_autocast_and_mfu_uses_a_bf16_peak(tiny_corpus, cache_dir):
    """bf16: DeepSpeed's bf16 weights in the trainer, autocast in the plain loop; different
    rounding, the same training within bf16's precision; MFU against a bf16 matmul probe."""
    overrides = [*TINY, f"data.source={tiny_corpus}", "train.global_batch_size=8", "train.precision=bf16",
                 "train.grad_accum_dtype=bf16"]
    out = run_cli(["bench", PRESET, "--steps", "6", "--warmup", "2", "--repeat", "1", "--json",
                   *sets(*overrides)], cache_dir)
    r = json.loads(out.stdout)
    engine, plain = r["engine"], r["plain"]
    assert engine["final_loss"] == pytest.approx(plain["final_loss"], rel=0.03)
    out32 = run_cli(["bench", PRESET, "--steps", "6", "--warmup", "2", "--repeat", "1", "--json",
                     *sets(*overrides[:-2])], cache_dir)  # fp32
    fp32 = json.loads(out32.stdout)["plain"]
    assert engine["peak_flops"] == plain["peak_flops"] != fp32["peak_flops"]  # probed in bf16
    assert fp32["final_loss"] != plain["final_loss"]  # autocast really changed the arithmetic
    assert plain["final_loss"] == pytest.approx(fp32["final_loss"], rel=0.03)


@pytest.mark.distributed
def test_bench_under_data_parallelism_times_communication_once_per_step(tiny_corpus, cache_dir):
    """dp2 with 4 accumulation micro-steps: both variants reduce gradients once per optimizer
    step, not once per micro-step, and the time inside collectives is its own phase."""
    overrides = [*TINY, f"data.source={tiny_corpus}", "train.micro_batch_size=1", "train.global_batch_size=8"]
    out = run_cli(["bench", PRESET, "--steps", "4", "--warmup", "1", "--repeat", "1", "--nproc", "2", "--json",
                   *sets(*overrides)], cache_dir)
    r = json.loads(out.stdout)
    engine, plain = r["engine"], r["plain"]
    assert engine["world_size"] == plain["world_size"] == 2
    assert engine["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-5)
    assert plain["collectives_per_step"] == 1
    assert 1 <= engine["collectives_per_step"] < 4  # gradients once, plus the non-finite check
    for v in (engine, plain):
        assert v["ms_per_step"]["communication"] > 0
        # The comm block: the whole fp32 gradient, once per step (a few scalars beside it).
        assert 0 <= v["comm"]["dp.all_reduce"]["bytes"] - 4 * v["params"] <= 64, v["comm"]


@pytest.mark.distributed
def test_bench_honours_tensor_parallelism_with_the_trainers_own_builders(tiny_corpus, cache_dir):
    """tp2 over 2 processes: the bench builds the run as ``seqtrain train`` does (the tensor-
    parallel model, the same data), so its losses equal one process's; the plain loop, which
    is data-parallel only, is left out rather than run on a layout it cannot do."""
    overrides = [*TINY, f"data.source={tiny_corpus}", "train.global_batch_size=8"]
    args = ["bench", PRESET, "--steps", "4", "--warmup", "1", "--repeat", "1", "--json"]
    one = json.loads(run_cli([*args, *sets(*overrides)], cache_dir).stdout)["engine"]
    r = json.loads(run_cli([*args, "--nproc", "2", *sets(*overrides, "parallel.tp=2")], cache_dir).stdout)
    tp = r["engine"]
    assert r["plain"] is None and "engine_overhead" not in r
    assert tp["layout"] == {"dp": 1, "tp": 2, "pp": 1, "zero_stage": 0} and tp["world_size"] == 2
    assert tp["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    assert tp["params"] == one["params"] and tp["flops_per_token"] == one["flops_per_token"]
    assert tp["ms_per_step"]["communication"] > 0  # the tensor-parallel all-reduces
