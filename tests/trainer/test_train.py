"""End-to-end training through the real CLI, DeepSpeed engine and run-directory contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, TINY, cli_env, read_metrics, run_cli, sets

PRESET = str(REPO / "configs/gpt/debug.yaml")


def test_single_process_run_learns_and_fills_the_run_directory(tiny_corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = run_cli(["train", PRESET, "--run-dir", str(run_dir), *sets(
        *TINY, f"data.source={tiny_corpus}", "train.steps=60", "train.global_batch_size=8",
        "eval.every=30", "checkpoint.every=30", "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=t",
    )], cache_dir)

    rows, evals = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= rows[0].keys()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Untrained, the model predicts ~uniformly: the first loss is ln(vocab).
    assert abs(rows[0]["loss"] - math.log(cfg["model"]["vocab_size"])) < 0.2
    assert sum(r["loss"] for r in rows[-5:]) / 5 < 0.25 * rows[0]["loss"]
    assert [e["step"] for e in evals] == [30, 60] and evals[1]["val_loss"] < rows[0]["loss"] * 0.25
    assert rows[0]["lr"] == pytest.approx(1e-2 / 2) and rows[-1]["lr"] < rows[10]["lr"]  # warm-up, decay
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)

    # The saved config is the resolved one.
    assert (cfg["parallel"]["dp"], cfg["train"]["grad_accum"], cfg["train"]["global_batch_size"]) == (1, 2, 8)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp", "latest", "step_00000030", "step_00000060"]
    assert (ckpts / "latest").read_text().strip() == "step_00000060"
    assert not any((ckpts / ".tmp").iterdir())
    # Memory accounting: host RSS phases; imports alone (torch) hold over 100 MB.
    (mem,) = json.loads((run_dir / "memory.json").read_text())
    assert mem["rank"] == 0 and mem["device"] == "cpu (resident set)"
    assert 100 < mem["baseline_mb"] <= mem["init_peak_mb"] and mem["train_peak_mb"] > 100
    assert f"peak memory {mem['train_peak_mb']:,.0f} MB per rank (host RSS)" in p.stdout
    # Start-up: the first row holds the time to the first step and its parts, which add up.
    first = rows[0]
    parts = {k: v for k, v in first.items() if k.startswith("startup_")}
    assert set(parts) == {f"startup_{k}_s" for k in ("imports", "config", "setup", "data", "model", "engine",
                                                      "resume", "callbacks", "first_step")}
    assert 0 < first["time_to_first_step_s"] == pytest.approx(sum(parts.values()), abs=0.05)
    assert not any(k.startswith("startup_") for r in rows[1:] for k in r)
    assert f"first step {first['time_to_first_step_s']:.2f} s after the process started (imports" in p.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["model.d_model"] == "32"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 61))
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in rows])
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]

    out = run_cli(["generate", str(run_dir), "--prompt", "the cat", "--temperature", "0",
                   "--max-new-tokens", "12"], cache_dir).stdout
    text = out.split("----- sample 0 -----\n")[1]
    assert text.startswith("the cat ")
    # A trained model continues with words of the corpus' templates.
    assert any(w in text for w in ("sees", "likes", "follows", "draws", "finds"))


def test_tokenizer_larger_than_the_model_vocab_is_refused(tiny_corpus, cache_dir, tmp_path):
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "r"), *sets(
        *TINY, f"data.source={tiny_corpus}", "model.vocab_size=100")], cache_dir, check=False)
    assert p.returncode == 2
    assert "has 300 tokens but model.vocab_size=100" in p.stderr.strip().splitlines()[-1]


@pytest.mark.distributed
def test_two_process_zero2_matches_one_process(tiny_corpus, cache_dir, tmp_path):
    """dp2 with ZeRO-2 and the same global batch gives the single-process losses (fp32)."""
    common = [*TINY, f"data.source={tiny_corpus}", "train.steps=8", "parallel.zero_stage=2",
              "train.micro_batch_size=4", "train.global_batch_size=8"]
    run_cli(["train", PRESET, "--run-dir", str(tmp_path / "one"), *sets(*common)], cache_dir)
    run_cli(["train", PRESET, "--run-dir", str(tmp_path / "two"), *sets(*common)], cache_dir, nproc=2)
    one, _ = read_metrics(tmp_path / "one")
    two, _ = read_metrics(tmp_path / "two")
    assert yaml.safe_load((tmp_path / "two/config.yaml").read_text())["parallel"]["dp"] == 2
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
    assert one[-1]["loss"] < one[0]["loss"] - 1.0  # it trained, so parity is not trivial
    assert [m["rank"] for m in json.loads((tmp_path / "two" / "memory.json").read_text())] == [0, 1]
    # The ZeRO-2 shards of two ranks consolidate to the single-process weights.
    from trainer.checkpoint import load_model_state, resolve

    w1, w2 = load_model_state(resolve(tmp_path / "one")), load_model_state(resolve(tmp_path / "two"))
    assert w1.keys() == w2.keys()
    # Adam divides by sqrt(v): rounding-level gradient differences grow to ~1e-5 in 8 steps.
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_corpus_shorter_than_one_window_is_a_one_line_error(cache_dir, tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(20):
        (tmp_path / "c" / f"{i}.txt").write_text("hi\n")
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "r"), *sets(
        *TINY, f"data.source={tmp_path / 'c'}", "data.tokenizer.kind=char", "data.tokenizer.vocab_size=8")],
        cache_dir, check=False)
    assert p.returncode == 2
    assert "fewer than one window of data.seq_len=32" in p.stderr.strip().splitlines()[-1]


def test_demo_entry_point_end_to_end(cache_dir, tmp_path):
    """``make demo`` (the README's first command) on a reduced step count."""
    run_dir = tmp_path / "demo"
    env = cli_env(cache_dir)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    demo_args = " ".join(sets("train.steps=6", "train.log_every=2", "eval.every=0", "eval.batches=1",
                              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "data.max_bytes=400000"))
    p = subprocess.run(
        ["make", "-s", "demo", f"VENV={sys.prefix}", f"RUN_DIR={run_dir}", f"DEMO_ARGS={demo_args}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "----- sample 0 -----\ndef " in p.stdout
    assert "MLflow run " in p.stdout and f"run directory: {run_dir}" in p.stdout
    rows, _ = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()


@pytest.mark.parametrize("preset,tie", [("gpt/debug.yaml", True), ("gpt/debug.yaml", False),
                                        ("encdec/debug.yaml", True), ("rnn/lstm-lm-debug.yaml", True)])
def test_meta_reference_model_counts_what_the_real_model_has(preset, tie):
    """The meta-device model (FLOPs and counts of tp/pp runs, the scaling planner) keeps tied
    weights tied: its parameter count and FLOPs equal the materialised model's."""
    from models import build
    from trainer.config import load_config
    from trainer.parallel.materialize import reference_model

    cfg = load_config(str(REPO / "configs" / preset), [])
    for key in ("vocab_size", "src_vocab_size", "tgt_vocab_size"):
        if hasattr(cfg.model, key) and getattr(cfg.model, key) is None:
            setattr(cfg.model, key, 512)
    if cfg.model.family == "gpt":
        cfg.model.tie_embeddings = tie
    meta, real = reference_model(cfg), build(cfg.model, seed=0)
    assert next(meta.parameters()).is_meta
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (tied tensors once)
    assert count(meta) == count(real)
    if hasattr(real, "flops_per_token"):
        assert meta.flops_per_token(cfg.data.seq_len) == real.flops_per_token(cfg.data.seq_len)


def test_a_launch_this_host_cannot_hold_is_refused_before_the_model_is_built(cache_dir, tmp_path):
    """The 1.5 B preset on this machine: the planner's prediction for every rank of the host
    against the memory the job may use (the cgroup's limit or MemAvailable), in one line."""
    import time

    t0 = time.perf_counter()
    p = run_cli(["train", str(REPO / "configs/gpt/gpt2-1.5b.yaml"), "--run-dir", str(tmp_path / "xl")],
                cache_dir, check=False)
    seconds = time.perf_counter() - t0
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    msg = p.stderr.strip()
    assert "GiB of host memory (1 rank(s) ×" in msg and "GiB are available (" in msg and "memory_check=false" in msg
    assert not (tmp_path / "xl" / "config.yaml").exists()  # refused before the data and the model
    assert seconds < 10, seconds


def test_the_start_up_line_predicts_step_time_and_eta_and_warns_past_the_hang_timeout(tiny_corpus, cache_dir, tmp_path, capsys):
    p = run_cli(["train", PRESET, "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, f"data.source={tiny_corpus}", "train.steps=2")], cache_dir)
    line = next(ln for ln in p.stdout.splitlines() if "M params, world 1" in ln)
    assert "per step, ETA" in line and "for 2 steps (seqtrain plan)" in line
    assert "warning: one step" not in p.stdout
    # A device a million times slower: one step outlasts the watchdog's timeout, said up front.
    from types import SimpleNamespace

    import torch

    from trainer.config import load_config
    from trainer.train import _predicted

    cfg = load_config(str(tmp_path / "run" / "config.yaml"), ["train.hang_timeout_s=60"])
    said = _predicted(cfg, SimpleNamespace(peak_flops=1e5), torch.device("cpu"))
    out = capsys.readouterr().out
    assert "warning: one step is predicted to take" in out and "longer than train.hang_timeout_s=60" in out
    assert said.startswith("; predicted") and (" min per step" in said or " h per step" in said)
