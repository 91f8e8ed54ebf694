"""The train loop against a fake train module: it knows no engine, only the module's interface.

What it must do by itself: hand the module each step's micro-batches in order, log at the
cadence with the tokens and the module's metrics, evaluate the same validation slice for every
layout, stop a run that keeps skipping updates, and save/restore its own state.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from trainer.config import load_config
from trainer.data.build import Data
from trainer.engine.train_module import EngineModule
from trainer.loop import Callback, Trainer
from trainer.parallel import ParallelDims


class FakeModule:
    """Loss of a step = mean over its micro-batches of the batch's first label; no engine."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims, self.device = dims, torch.device("cpu")
        self.flops_per_token, self.peak_flops = 10.0, 1e6
        self.model = torch.nn.Linear(2, 2)
        self.seen: list[list[int]] = []  # labels[0] of each micro-batch, per step
        self.skip_next: list[bool] = []  # whether each coming step's update is skipped
        self.skipped_steps = 0
        self.run = 0  # skipped in a row (the real module leaves fp16 loss-scaler skips out)
        self.steps = 0
        self.eval_calls: list[tuple[int, int]] = []
        self.mode = "train"

    def train_batch(self, micro_batches, on_output=None, mark=None):
        ids = [int(b["labels"][0, 0]) for b in micro_batches]
        self.seen.append(ids)
        self.steps += 1
        skip = bool(self.skip_next) and self.skip_next.pop(0)
        self.skipped_steps += skip
        self.run = self.run + 1 if skip else 0
        return torch.tensor(float(np.mean(ids))), torch.tensor(4 * len(ids))

    def eval_loss_sum(self, batches, counted, on_output=None):
        assert self.mode == "eval"
        self.eval_calls.append((len(batches), counted))
        return torch.tensor(float(sum(int(b["labels"][0, 0]) for b in batches[:counted])))

    def lr(self) -> float:
        return 0.1 * (self.steps + 1)

    def mfu(self, tokens_per_s_per_device):
        return tokens_per_s_per_device * self.flops_per_token / self.peak_flops

    def nonfinite_run(self):
        return self.run

    def step_metrics(self):
        return {"grad_norm": 1.5, "skipped_steps": self.skipped_steps}

    def state_dict(self):
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        self.skipped_steps = state["skipped_steps"]

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"


class FakeBatches:
    """micro-batch (step, micro, rank) carries label 100·step + 10·micro + rank; validation
    batch b of rank r carries its global index."""

    def micro_batch(self, step, micro, rank):
        return {"labels": torch.full((2, 2), 100 * step + 10 * micro + rank)}

    def eval_batches(self, rank, dp, n):
        return [{"labels": torch.full((1, 1), b * dp + rank)} for b in range(n)]

    def epoch_of(self, step):
        return step / 100


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.rows: list[dict] = []

    def on_load(self, t):
        self.events.append(("load", t.step))

    def on_train_start(self, t):
        self.events.append(("start", t.step))

    def on_step_end(self, t):
        self.events.append(("end", t.step))

    def on_log(self, t, metrics):
        self.rows.append(metrics)

    def on_train_end(self, t):
        self.events.append(("finish", t.step))


def _trainer(overrides=(), dims: ParallelDims | None = None, callbacks=()):
    dims = dims or ParallelDims(1, 1, 1, 0)
    cfg = load_config(str(REPO / "configs/gpt/debug.yaml"),
                      ["train.steps=5", "train.log_every=2", "train.grad_accum=3", "train.global_batch_size=null",
                       "data.prefetch=false",
                       "eval.batches=3", *overrides]).resolve(dims.world_size)
    module = FakeModule(dims)
    data = Data(cfg, FakeBatches(), FakeBatches(), [])
    return Trainer(cfg, module, data, list(callbacks)), module


def test_steps_get_their_micro_batches_in_order_and_rows_follow_the_logging_cadence():
    rec = Recorder()
    t, module = _trainer(callbacks=[rec])
    t.fit()
    assert module.seen == [[100 * s + 10 * m for m in range(3)] for s in range(5)]
    assert [r["step"] for r in rec.rows] == [2, 4, 5]  # every 2 steps, and the last
    assert [r["tokens"] for r in rec.rows] == [24, 48, 60]  # 4 targets × 3 micro-batches a step
    last = rec.rows[-1]
    assert last["loss"] == pytest.approx(410) and last["lr"] == pytest.approx(0.5)
    assert last["grad_norm"] == 1.5 and last["skipped_steps"] == 0 and last["epoch"] == 0.05
    assert last["mfu"] == pytest.approx(last["tokens_per_s"] * 10.0 / 1e6)
    assert rec.events[:2] == [("load", 0), ("start", 0)]
    assert rec.events[2:] == [("end", s) for s in range(1, 6)] + [("finish", 5)]


def test_evaluation_takes_the_same_global_slice_whatever_the_rank():
    """eval.batches=3 over dp 2: rank 1 runs as many batches as rank 0 (2) but counts only
    global batch 1; batch 3 is the surplus."""
    t, module = _trainer(dims=ParallelDims(2, 1, 1, 1), overrides=["train.grad_accum=1"])
    metrics = t.evaluate()
    assert module.eval_calls == [(2, 1)] and module.mode == "train"
    assert metrics["val_loss"] == pytest.approx(1 * 2 / 3)  # this rank's sum, scaled by dp / n
    t0, module0 = _trainer(dims=ParallelDims(2, 1, 1, 0), overrides=["train.grad_accum=1"])
    t0.evaluate()
    assert module0.eval_calls == [(2, 2)]  # global batches 0 and 2


@pytest.mark.parametrize("log_every, stop_at", [(2, 4), (1, 4), (3, 6)])
def test_skipped_updates_in_a_row_stop_the_run_at_the_logging_cadence(log_every, stop_at):
    """Patience 2: skips at steps 1, 3, 4, 5, ...; the run of them is read where the loop reads
    the device (every ``log_every`` steps), so the stop comes at the first such step past it."""
    t, module = _trainer(["train.nonfinite_patience=2", "train.steps=8", f"train.log_every={log_every}"])
    module.skip_next = [True, False, True, True, True, True, True, True]
    t.fit()
    assert t.diverged and t.step == stop_at
    run = stop_at - 2
    assert t.stop_reason == (f"{run} consecutive steps with non-finite gradients; the weights are those of "
                             f"step 2, before them")
    t, module = _trainer(["train.nonfinite_patience=2", "train.steps=8", "train.log_every=4"])
    module.skip_next = [False, True, True, False]  # two in a row, then recovered before the check
    t.fit()
    assert not t.diverged and t.step == 8


def test_state_round_trip_restores_step_counters_and_random_streams():
    t, module = _trainer()
    t.fit()
    module.skipped_steps = 3
    state = t.state_dict()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    fresh, fresh_module = _trainer()
    fresh.load_state_dict(state)
    assert fresh.step == 5 and fresh.tokens_seen == 60 and fresh_module.skipped_steps == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def _engine_module(precision_fp16: bool, guard_skips: int, engine_skips: int) -> EngineModule:
    optimizer = SimpleNamespace(cur_scale=2048.0)
    engine = SimpleNamespace(skipped_steps=engine_skips, optimizer=optimizer, gradient_clipping=lambda: 0.0,
                             fp16_enabled=lambda: precision_fp16, get_global_grad_norm=lambda: None,
                             module=torch.nn.Linear(2, 2))  # a model without the z-loss
    return EngineModule(engine, None, ParallelDims(1, 1, 1, 0), torch.device("cpu"),
                        guard=SimpleNamespace(skipped=guard_skips))


def test_engine_module_counts_skips_of_guard_and_engine_and_reports_the_fp16_loss_scale():
    m = _engine_module(True, guard_skips=2, engine_skips=3)
    assert m.step_metrics() == {"grad_norm": None, "skipped_steps": 5, "loss_scale": 2048.0}
    assert "loss_scale" not in _engine_module(False, 0, 0).step_metrics()
    # Resumed: DeepSpeed restores its own count, the saved total already holds it.
    resumed = _engine_module(True, guard_skips=0, engine_skips=3)
    resumed.load_state_dict(m.state_dict())
    assert resumed.skipped_steps == 5
    resumed.guard.skipped += 1
    assert resumed.skipped_steps == 6


def test_evaluation_reads_a_short_validation_split_once_not_its_head_twice(capsys):
    """eval.batches=7 over a split that holds 4 batches, dp 2: 4 global batches (a multiple of
    dp), each once, said in one line; a split that holds enough is read as asked."""
    short = FakeBatches()
    short.eval_capacity = 4
    t, module = _trainer(dims=ParallelDims(2, 1, 1, 0), overrides=["train.grad_accum=1", "eval.batches=7"])
    t.data = Data(t.cfg, FakeBatches(), short, [])
    metrics = t.evaluate()
    t.evaluate()
    assert module.eval_calls == [(2, 2), (2, 2)]  # global batches 0 and 2 on this rank
    assert metrics["val_loss"] == pytest.approx((0 + 2) * 2 / 4)
    assert capsys.readouterr().out.count("eval.batches=7 is more than the validation split holds") == 1
    roomy = FakeBatches()
    roomy.eval_capacity = 40
    t.data = Data(t.cfg, FakeBatches(), roomy, [])
    t.evaluate()
    assert module.eval_calls[-1] == (4, 4)  # 7 over dp 2: 4 rounds, global batches 0, 2, 4, 6
