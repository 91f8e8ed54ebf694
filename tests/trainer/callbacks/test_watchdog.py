"""Hang watchdog: a rank that stops making progress ends the job with its stacks on disk, the
stuck rank named, exit code 5; under ``torchrun --max-restarts`` the job restarts and resumes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.callbacks.watchdog import stuck_ranks

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_the_stuck_rank_is_the_one_behind_or_the_one_silent():
    r = lambda rank, step, phase: {"rank": rank, "step": step, "phase": phase}  # noqa: E731
    # Rank 2 never started step 5's work; the others wait inside it.
    assert stuck_ranks([r(0, 5, "train"), r(1, 5, "train"), r(2, 4, "done"), r(3, 5, "train")], 4)[0] == [2]
    # Rank 1 finished step 4 but not its hooks (a checkpoint save on a dead mount, say).
    assert stuck_ranks([r(0, 5, "train"), r(1, 4, "train")], 2)[0] == [1]
    assert stuck_ranks([r(0, 5, "train"), r(2, 5, "train")], 3) == ([1], "wrote no report: dead, or stuck outside the Python interpreter")
    assert stuck_ranks([r(0, 5, "train"), r(1, 5, "train")], 2)[0] == []  # all wait: the stacks tell


@pytest.mark.distributed
def test_a_hung_rank_is_named_and_the_restarted_job_resumes_and_finishes(tiny_corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=6", "train.global_batch_size=8",
            "checkpoint.every=1", "train.hang_timeout_s=4"]
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir, nproc=2,
                env={"SEQTRAIN_FAULT": "hang@3:r1"}, torchrun_args=("--max-restarts=1",))
    summary = json.loads((run / "hang" / "summary.json").read_text())
    assert summary["stuck_ranks"] == [1] and summary["why"].startswith("behind every other rank")
    assert {(r["rank"], r["step"], r["phase"]) for r in summary["reports"]} == {(0, 3, "train"), (1, 2, "done")}
    stuck_stack = (run / "hang" / "rank_00001.txt").read_text()
    assert "no progress for" in stuck_stack and "in on_step_start" in stuck_stack  # the fault's sleep
    assert "line" in (waiting := (run / "hang" / "rank_00000.txt").read_text()) and " in all_reduce" in waiting
    assert "stuck: rank 1" in p.stderr and "exitcode: 5" in p.stderr  # torchrun saw the watchdog's exit
    assert "resumed from" in p.stdout and "step_00000002 at step 2" in p.stdout
    rows, _ = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))


def test_a_slow_step_that_moves_is_not_a_hang(tiny_corpus, cache_dir, tmp_path):
    """Step 2 takes longer than train.hang_timeout_s (every linear layer sleeps first), but its
    forwards and backwards beat: the run finishes. A hang (``hang@``) still ends it, above."""
    from trainer.callbacks.faults import SLOW_LINEAR_S

    run = tmp_path / "run"
    timeout = 2.0
    args = [*TINY, f"data.source={tiny_corpus}", "train.steps=3", f"train.hang_timeout_s={timeout}"]
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir,
                env={"SEQTRAIN_FAULT": "slowstep@2"})
    assert not (run / "hang").exists(), p.stderr[-2000:]
    rows, _ = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Two blocks' four linears and the head, each sleeping: the step outlasts the timeout.
    assert timeout < 9 * SLOW_LINEAR_S
