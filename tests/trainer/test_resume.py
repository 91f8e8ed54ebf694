"""Exact resume: a run stopped by a signal and resumed equals the uninterrupted run, bit for bit."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.callbacks.faults import Fault, parse
from trainer.errors import ConfigError

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


def _by_step(run_dir) -> dict[int, dict]:
    """Train rows by step; a step logged twice (before a crash and after the restart) keeps
    the later row."""
    rows, _ = read_metrics(run_dir)
    return {r["step"]: r for r in rows}


@pytest.mark.distributed
def test_tp2_pp2_stop_then_resume_equals_uninterrupted_run(tiny_corpus, cache_dir, tmp_path):
    """4 processes: tensor 2 × pipeline 2, dropout on (per-stage RNG streams are restored)."""
    args = [*TINY, f"data.source={tiny_corpus}", "model.n_layer=4", "model.dropout=0.1",
            "parallel.tp=2", "parallel.pp=2", "parallel.vocab_multiple=64", "train.steps=8",
            "train.micro_batch_size=2", "train.global_batch_size=8", "checkpoint.every=4"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli(["train", PRESET, "--run-dir", str(straight), *sets(*args)], cache_dir, nproc=4)
    first = run_cli(["train", PRESET, "--run-dir", str(interrupted), *sets(*args)], cache_dir, nproc=4,
                    env={"SEQTRAIN_FAULT": "term@3"})
    assert "stopped at step 3 (received SIGTERM)" in first.stdout
    second = run_cli(["train", PRESET, "--run-dir", str(interrupted), *sets(*args)], cache_dir, nproc=4)
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    a, b = _by_step(straight), _by_step(interrupted)
    assert sorted(b) == list(range(1, 9))
    for s in a:
        for key in ("loss", "grad_norm", "lr"):
            assert a[s][key] == b[s][key], (key, a[s], b[s])  # bitwise on CPU fp32


@pytest.mark.distributed
def test_sigkilled_rank_restarts_under_torchrun_and_finishes_like_an_uninterrupted_run(
        tiny_corpus, cache_dir, tmp_path):
    """dp2 under ``torchrun --max-restarts=1``: rank 1 is SIGKILLed after step 5 (no cleanup, no
    save); the agent restarts both workers, which resume from step 4's checkpoint."""
    args = [*TINY, f"data.source={tiny_corpus}", "model.dropout=0.1", "train.steps=8",
            "train.global_batch_size=8", "checkpoint.every=2", "parallel.zero_stage=1"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cli(["train", PRESET, "--run-dir", str(straight), *sets(*args)], cache_dir, nproc=2)
    p = run_cli(["train", PRESET, "--run-dir", str(crashed), *sets(*args)], cache_dir, nproc=2,
                env={"SEQTRAIN_FAULT": "kill@5:r1"}, torchrun_args=("--max-restarts=1",))
    assert "resumed from" in p.stdout and "step_00000004 at step 4" in p.stdout
    assert "failed (exitcode: -9) local_rank: 1" in p.stderr  # the agent saw the SIGKILL
    a, b = _by_step(straight), _by_step(crashed)
    assert sorted(b) == list(range(1, 9))
    for s in a:
        for key in ("loss", "grad_norm", "lr"):
            assert a[s][key] == b[s][key], (key, a[s], b[s])
