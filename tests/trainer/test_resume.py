"""Exact resume: a run stopped by a signal and resumed equals the uninterrupted run, bit for bit."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.errors import ConfigError
from trainer.faults import Fault, parse

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_signal_stop_then_resume_equals_uninterrupted_run_with_accumulation(tiny_corpus, cache_dir, tmp_path):
    # Dropout on: the resumed run must also restore the RNG streams to match.
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=12", "train.global_batch_size=8",
            "model.dropout=0.1", "checkpoint.every=4"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli(["train", PRESET, "--run-dir", str(straight), *sets(*args)], cache_dir)

    first = run_cli(["train", PRESET, "--run-dir", str(interrupted), *sets(*args)], cache_dir,
                    env={"SEQTRAIN_FAULT": "usr1@6"})
    assert "stopped at step 6 (received SIGUSR1)" in first.stdout
    assert (interrupted / "checkpoints/latest").read_text().strip() == "step_00000006"
    rows, _ = read_metrics(interrupted)
    assert [r["step"] for r in rows] == list(range(1, 7))

    second = run_cli(["train", PRESET, "--run-dir", str(interrupted), *sets(*args)], cache_dir)
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    a, _ = read_metrics(straight)
    b, _ = read_metrics(interrupted)
    assert [r["step"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert ra[key] == rb[key], (key, ra, rb)  # bitwise on CPU fp32


def test_fault_specs_parse_and_bad_specs_are_config_errors():
    assert parse("kill@5:r1, usr1@3,term@2:r*") == [
        Fault("kill", 5, 1), Fault("usr1", 3, 0), Fault("term", 2, None)]
    with pytest.raises(ConfigError, match="'explode@3' is not ACTION@STEP"):
        parse("explode@3")
