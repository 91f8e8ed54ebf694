"""``seqtrain eval RUN --follow``: each complete checkpoint scored once, as it appears, until the
run has finished; a preempted run is waited for; a restarted follower scores nothing twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import REPO, TINY, cli_env, make_corpus, run_cli, sets

PRESET = str(REPO / "configs/gpt/debug.yaml")


def _rows(run) -> list[dict]:
    f = run / "eval/results.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


def test_follow_scores_checkpoints_as_they_appear_and_restarts_without_rescoring(cache_dir, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    staged = run / "checkpoints/.tmp/step_00000005"  # a save in progress: never read
    staged.mkdir(parents=True)
    (staged / "model_states.pt").write_bytes(b"half")
    train = ["train", PRESET, "--run-dir", str(run), *sets(
        *TINY, f"data.source={corpus}", "train.steps=30", "train.global_batch_size=8",
        "checkpoint.every=10", "checkpoint.keep_last=null")]
    follower = subprocess.Popen(
        [sys.executable, "-m", "trainer", "eval", str(run), "--follow", "--every-seconds", "0.5", "--json"],
        cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Preempted after step 10 (saves and stops, not finished): the follower scores it and waits.
        run_cli(train, cache_dir, env={"SEQTRAIN_FAULT": "usr1@10"})
        deadline = time.time() + 180
        while not _rows(run) and time.time() < deadline:
            time.sleep(0.5)
        assert [r["step"] for r in _rows(run)] == [10]
        time.sleep(2)
        assert follower.poll() is None and not (run / "finished.json").exists()
        run_cli(train, cache_dir)  # the requeued job: resumes and finishes at 30
        out, err = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert follower.returncode == 0, err[-3000:]
    assert [r["step"] for r in json.loads(out)] == [10, 20, 30]
    assert json.loads((run / "finished.json").read_text()) == {"step": 30, "reason": "completed"}
    assert [r["step"] for r in _rows(run)] == [10, 20, 30]

    # A restarted follower finds everything scored: nothing again, the same answer.
    p = run_cli(["eval", str(run), "--follow", "--every-seconds", "0.5", "--json"], cache_dir)
    assert "scored" not in p.stderr and json.loads(p.stdout) == json.loads(out)
    assert len(_rows(run)) == 3
