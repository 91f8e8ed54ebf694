"""The plain-PyTorch engine of one-process fp32 runs against DeepSpeed's: the same numbers step
for step, checkpoints that move between the two, and no DeepSpeed import on its path."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO, TINY, cli_env, read_metrics, run_cli, sets

# Accumulation (the loss divided before backward, the optimizer at the boundary) and clipping
# (a norm large enough to clip in the first steps) are where the two engines could part.
ARGS = [*TINY, "train.grad_accum=2", "train.global_batch_size=8", "train.grad_clip=0.5", "train.weight_decay=0.1"]


def _train(run_dir, corpus, cache_dir, steps: int, *extra: str, env=None) -> list[dict]:
    run_cli(["train", "configs/gpt/debug.yaml", "--run-dir", str(run_dir),
             *sets(*ARGS, f"data.source={corpus}", f"train.steps={steps}", "checkpoint.every=4", *extra)],
            cache_dir, env=env)
    return read_metrics(run_dir)[0]


def _numbers(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]


def test_same_losses_norms_and_rates_as_deepspeed_engine(tiny_corpus, cache_dir, tmp_path):
    local = _train(tmp_path / "local", tiny_corpus, cache_dir, 8)
    ds = _train(tmp_path / "ds", tiny_corpus, cache_dir, 8, "train.engine=deepspeed")
    assert len(local) == 8
    assert _numbers(local) == _numbers(ds)  # bit for bit
    assert local[0]["grad_norm"] > 0.5  # clipping was exercised


def test_checkpoints_move_between_the_engines_exactly(tiny_corpus, cache_dir, tmp_path):
    """Stopped at step 4 on one engine, resumed on the other: what a run straight through gives
    (dropout on, so the RNG streams must carry over too)."""
    straight = _numbers(_train(tmp_path / "straight", tiny_corpus, cache_dir, 8, "model.dropout=0.1"))
    for first, second in [((), ("train.engine=deepspeed",)), (("train.engine=deepspeed",), ())]:
        run = tmp_path / f"switch{len(first)}"
        _train(run, tiny_corpus, cache_dir, 8, "model.dropout=0.1", *first, env={"SEQTRAIN_FAULT": "usr1@4"})
        resumed = _train(run, tiny_corpus, cache_dir, 8, "model.dropout=0.1", *second)
        assert _numbers(resumed) == straight, (first, second)


def test_a_one_process_run_never_imports_deepspeed(tiny_corpus, cache_dir, tmp_path):
    """Training with evaluation and saves, then its resume; DeepSpeed's import costs seconds."""
    run = tmp_path / "run"
    for steps in (4, 6):
        args = ["train", "configs/gpt/debug.yaml", "--run-dir", str(run),
                *sets(*TINY, f"data.source={tiny_corpus}", "checkpoint.every=2", "eval.every=2", f"train.steps={steps}")]
        code = (f"import sys\nfrom trainer.cli import run\nrc = run({args!r})\n"
                "print('DEEPSPEED', 'deepspeed' in sys.modules)\nsys.exit(rc)\n")
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(cache_dir),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "DEEPSPEED False" in p.stdout, p.stdout[-2000:]
    assert "resumed from" in p.stdout
    shutil.rmtree(run)
