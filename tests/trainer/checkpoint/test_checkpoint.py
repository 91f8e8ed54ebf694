"""Checkpoint integrity: manifests, fallback past a damaged checkpoint, refusing a mismatch."""

from __future__ import annotations

import json

from tests.conftest import REPO, TINY, read_metrics, run_cli, sets
from trainer.checkpoint import verify

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_damaged_latest_falls_back_to_the_previous_checkpoint_and_resumes_exactly(tiny_corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"data.source={tiny_corpus}", "train.global_batch_size=8", "checkpoint.every=4",
            "checkpoint.keep_last=null", "train.steps=12"]
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir)
    first, _ = read_metrics(run)
    ckpts = run / "checkpoints"
    for step in (4, 8, 12):
        ckpt = ckpts / f"step_{step:08d}"
        assert verify(ckpt) is None
        mf = json.loads((ckpt / "manifest.json").read_text())
        assert mf["step"] == step and len(mf["tokenizer_sha256"]) == 64
        assert all((ckpt / f).stat().st_size == v["size"] for f, v in mf["files"].items())
    # Damage the newest checkpoint behind the manifest's back.
    states = next((ckpts / "step_00000012").glob("mp_rank_*_model_states.pt"))
    states.write_bytes(states.read_bytes()[:-100])
    assert "bytes, the manifest says" in verify(ckpts / "step_00000012")
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir)
    assert "checkpoint" in p.stdout and "is damaged" in p.stdout
    assert "resumed from" in p.stdout and "step_00000008 at step 8" in p.stdout
    again, _ = read_metrics(run)
    # Steps 9..12 re-run from the step-8 checkpoint give exactly the losses of the first run.
    assert [r["loss"] for r in again] == [r["loss"] for r in first]


def test_resuming_with_another_model_shape_or_tokenizer_is_refused(tiny_corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"data.source={tiny_corpus}", "train.global_batch_size=8", "train.steps=2"]
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args)], cache_dir)
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args, "model.d_model=64", "train.steps=4")],
                cache_dir, check=False)
    assert p.returncode == 2
    assert "was trained with model.d_model=32, this run has model.d_model=64" in p.stderr.strip().splitlines()[-1]
    from tests.conftest import make_corpus

    other = make_corpus(tmp_path / "other", seed=7)  # same vocabulary size, other merges
    other_args = [a if not a.startswith("data.source=") else f"data.source={other}" for a in args]
    p = run_cli(["train", PRESET, "--run-dir", str(run), *sets(*other_args, "train.steps=4")],
                cache_dir, check=False)
    assert p.returncode == 2 and "another tokenizer" in p.stderr.strip().splitlines()[-1]
    # Dropout is not part of the shape: changing it on resume is allowed.
    run_cli(["train", PRESET, "--run-dir", str(run), *sets(*args, "model.dropout=0.1", "train.steps=3")], cache_dir)
