"""What the loop logs about skipped updates, on a stand-in engine (fp16 needs a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

from tests.conftest import REPO
from trainer.config import load_config
from trainer.loop import Trainer
from trainer.parallel import ParallelDims


def _trainer(precision: str, engine) -> Trainer:
    cfg = load_config(str(REPO / "configs/gpt/debug.yaml"), [f"train.precision={precision}",
                                                             "train.nonfinite_patience=2"]).resolve(1)
    return Trainer(cfg, engine, None, ParallelDims(1, 1, 1, 0), None, None, None, 1.0, 1.0, [])


def test_fp16_overflows_are_counted_with_the_loss_scale_but_do_not_stop_the_run():
    engine = SimpleNamespace(skipped_steps=0, optimizer=SimpleNamespace(cur_scale=65536.0), nonfinite_guard=None)
    t = _trainer("fp16", engine)
    for step in range(1, 6):  # the scaler halves the scale on each overflow
        engine.skipped_steps += 1
        engine.optimizer.cur_scale /= 2
        t.step = step
        t._check_divergence()
    assert t.skipped_steps == 5 and t._loss_scale() == {"loss_scale": 2048.0}
    assert not t.diverged


def test_consecutive_skips_stop_an_fp32_run_and_a_good_step_resets_the_count():
    guard = SimpleNamespace(skipped=0)
    engine = SimpleNamespace(skipped_steps=0, optimizer=None, nonfinite_guard=guard)
    t = _trainer("fp32", engine)
    for step, skipped in enumerate([1, 0, 1, 1], start=1):
        guard.skipped += skipped
        t.step = step
        t._check_divergence()
    assert t.diverged and t.stop_reason.startswith("2 consecutive steps with non-finite gradients")
    assert t._loss_scale() == {}
