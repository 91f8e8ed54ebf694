"""Shared fixtures: an isolated data cache, a tiny learnable corpus, CLI and torchrun runners."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.launch import torchrun

REPO = Path(__file__).resolve().parents[1]

# A tiny GPT that trains in seconds on 2 CPU cores; every test run builds on these overrides.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.max_seq_len=32",
    "data.seq_len=32", "data.tokenizer.vocab_size=300",
    "train.micro_batch_size=4", "train.warmup_steps=2", "train.lr=1e-2", "train.min_lr=1e-3",
    "train.log_every=1", "eval.every=0", "eval.batches=2", "tracking.enabled=false",
    "checkpoint.every=0",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/shard cache for the session (the stdlib corpus is tokenized once)."""
    return tmp_path_factory.mktemp("seqtrain-cache")


def make_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A small, learnable corpus: templated sentences over a tiny vocabulary, one file each."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the bird", "our teacher"]
    verbs = ["sees", "likes", "follows", "draws", "finds"]
    objects = ["the ball.", "a red box.", "the old tree.", "some water.", "the small house."]
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(30)]
        (root / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    env.update(SEQTRAIN_CACHE=str(cache_dir), DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return env


def run_cli(args: list[str], cache_dir: Path, cwd: Path | None = None, check: bool = True,
            nproc: int = 1, timeout: int = 600, env: dict[str, str] | None = None,
            torchrun_args: tuple[str, ...] = (), script: Path | None = None) -> subprocess.CompletedProcess:
    """``seqtrain ARGS`` in a fresh process (``torchrun --nproc_per_node`` when nproc > 1);
    ``script``: a Python file that runs the CLI itself (with instrumentation) instead."""
    entry = [str(script)] if script is not None else ["-m", "trainer"]
    if nproc > 1:
        cmd = [*torchrun(nproc), *torchrun_args, *entry, *args]
    else:
        cmd = [sys.executable, *entry, *args]
    p = subprocess.run(cmd, cwd=cwd or REPO, env={**cli_env(cache_dir), **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def sets(*pairs: str) -> list[str]:
    out: list[str] = []
    for p in pairs:
        out += ["--set", p]
    return out


def assert_resume_is_exact(preset: str, args: list[str], stop_at: int, steps: int, cache_dir: Path,
                           tmp_path: Path) -> None:
    """A run stopped by a signal at ``stop_at`` and resumed logs the uninterrupted run's loss,
    gradient norm and tokens at every step, bitwise (CPU, fp32)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(["train", preset, "--run-dir", str(straight), *sets(*args)], cache_dir)
    run_cli(["train", preset, "--run-dir", str(resumed), *sets(*args)], cache_dir,
            env={"SEQTRAIN_FAULT": f"usr1@{stop_at}"})
    second = run_cli(["train", preset, "--run-dir", str(resumed), *sets(*args)], cache_dir)
    assert f"at step {stop_at}" in second.stdout
    a, _ = read_metrics(straight)
    b, _ = read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss"], ra["grad_norm"], ra["tokens"]) == (rb["loss"], rb["grad_norm"], rb["tokens"])


def assert_two_processes_match_one(preset: str, args: list[str], steps: int, cache_dir: Path,
                                   tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """Two data-parallel processes log one process's losses (to 1e-5), gradient norms and
    tokens; returns both runs' evaluation rows."""
    run_cli(["train", preset, "--run-dir", str(tmp_path / "one"), *sets(*args)], cache_dir)
    run_cli(["train", preset, "--run-dir", str(tmp_path / "two"), *sets(*args)], cache_dir, nproc=2)
    (one, one_eval), (two, two_eval) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    return one_eval, two_eval


@pytest.fixture(scope="session")
def speech_recognizer(tmp_path_factory, cache_dir) -> Path:
    """A Transformer speech recognizer trained 300 steps on 1,500 spoken dates (a minute or
    two), shared by the recognition tests and the synthesis tests that listen with it."""
    run = tmp_path_factory.mktemp("speech") / "run"
    args = ["data.num_pairs=1500", "model.d_model=64", "model.n_enc_layers=2", "model.source.conv_channels=[64,64]",
            "train.steps=300", "train.micro_batch_size=16", "train.global_batch_size=16", "train.log_every=50",
            "eval.every=150", "eval.decode_samples=48", "checkpoint.every=300", "tracking.enabled=false"]
    run_cli(["train", str(REPO / "configs/speech/recognizer-debug.yaml"), "--run-dir", str(run), *sets(*args)],
            cache_dir)
    return run
