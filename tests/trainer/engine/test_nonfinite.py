"""Non-finite guard: a NaN step is skipped on every rank; K in a row stop the run with a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.checkpoint import load_model_state, verify

PRESET = str(REPO / "configs/gpt/debug.yaml")


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_model_state(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.mark.distributed
def test_nan_step_is_skipped_on_every_rank_and_training_goes_on(tiny_corpus, cache_dir, tmp_path):
    """ZeRO-1 under dp2, the NaN only on rank 1: both ranks skip the update of step 3 (the
    weights and optimizer state stay those of step 2), then train on."""
    run = tmp_path / "run"
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=6", "train.global_batch_size=8",
            "parallel.zero_stage=1", "checkpoint.every=1", "checkpoint.keep_last=null"]
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir, nproc=2,
            env={"SEQTRAIN_FAULT": "nan@3:r1"})
    rows, _ = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert math.isnan(rows[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    w2, w3, w4 = _weights(run, 2), _weights(run, 3), _weights(run, 4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # no update at all: not even weight decay
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # and the next step updates again
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_consecutive_nan_steps_stop_the_run_with_a_valid_checkpoint(tiny_corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=12", "checkpoint.every=2", "checkpoint.keep_last=null",
            "train.nonfinite_patience=3"]
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir, check=False,
                env={"SEQTRAIN_FAULT": "nan@3-20"})
    assert p.returncode == 3, p.stderr[-2000:]
    assert "stopped at step 5: 3 consecutive steps with non-finite gradients; the weights are those of step 2" in p.stdout
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000005"
    assert verify(run / "checkpoints/step_00000005") is None
    w2, w5 = _weights(run, 2), _weights(run, 5)
    assert all(torch.equal(w2[k], w5[k]) and torch.isfinite(w5[k]).all() for k in w2)


@pytest.mark.parametrize("zero", [0, 1], ids=["zero0-unfused", "zero1-bf16-optimizer"])
def test_nan_step_under_bf16_is_skipped_not_a_crash(zero, tiny_corpus, cache_dir, tmp_path):
    """bf16 runs DeepSpeed's own wrappers: ZeRO 0 (one micro-batch) its unfused fp16/bf16
    optimizer, ZeRO 1 with fp32 accumulation ``BF16_Optimizer``. A NaN gradient at step 3 is
    counted as skipped and leaves the weights of step 2; training goes on."""
    run = tmp_path / "run"
    batch = ["train.micro_batch_size=8"] if zero == 0 else ["train.micro_batch_size=4"]
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=5", "train.global_batch_size=8", *batch,
            "train.precision=bf16", f"parallel.zero_stage={zero}", "checkpoint.every=1", "checkpoint.keep_last=null"]
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir, env={"SEQTRAIN_FAULT": "nan@3"})
    rows, _ = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert math.isnan(rows[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    w2, w3, w4 = _weights(run, 2), _weights(run, 3), _weights(run, 4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)
    assert rows[-1]["loss"] < rows[0]["loss"]


def _guarded(fused: bool, device: str = "cpu"):
    from trainer.engine.nonfinite import NonFiniteGuard

    p = torch.nn.Parameter(torch.ones(3, device=device))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused, foreach=not fused)
    return p, opt, NonFiniteGuard(opt)


@pytest.mark.parametrize("fused, device", [
    (True, "cpu"), (False, "cpu"),
    pytest.param(True, "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])],
    ids=["fused-on-device", "foreach-on-host", "fused-cuda"])
def test_guard_skips_the_whole_update_and_counts_on_the_device(fused, device):
    """A non-finite gradient: no update at all (weight decay neither, Adam's step count not
    advanced), counted as skipped and as a run; a finite one updates and ends the run. The fused
    optimizer gets the verdict as ``found_inf`` (no host read); foreach reads it on the host."""
    p, opt, guard = _guarded(fused, device)
    reads = []
    item = torch.Tensor.item
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
        for g in (float("nan"), float("inf")):
            p.grad = torch.full((3,), g, device=device)
            opt.step()
            guard.end_step(engine_skipped=False)
    assert len(reads) == (0 if fused else 2)
    assert torch.equal(p.detach().cpu(), torch.ones(3)) and guard.skipped == 2 and guard.run() == 2
    assert not opt.state or float(opt.state[p]["step"]) == 0
    p.grad = torch.ones(3, device=device)
    opt.step()
    guard.end_step(engine_skipped=False)
    assert (p.detach() < 1).all() and guard.skipped == 2 and guard.run() == 0
    assert float(opt.state[p]["step"]) == 1


def test_engine_skips_extend_the_run_except_the_fp16_loss_scaler():
    """DeepSpeed skipping an update before the guard sees it (its overflow checks) counts in
    the run of skipped updates; its fp16 loss scaler halving the scale does not."""
    from types import SimpleNamespace

    from trainer.engine.train_module import EngineModule
    from trainer.parallel import ParallelDims

    for fp16, run in ((False, 2), (True, 0)):
        _, _, guard = _guarded(True)
        engine = SimpleNamespace(skipped_steps=0, gradient_clipping=lambda: 0.0, fp16_enabled=lambda f=fp16: f)
        module = EngineModule(engine, None, ParallelDims(1, 1, 1, 0), torch.device("cpu"), guard=guard)
        for _ in range(2):
            engine.skipped_steps += 1  # DeepSpeed skipped: the guard's step never ran
            module._end_step()
        assert module.nonfinite_run() == run and module.skipped_steps == 2
