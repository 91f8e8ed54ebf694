"""Fixtures of the tools' tests: one tiny GPT run that several test files evaluate."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, TINY, run_cli, sets

PRESET = str(REPO / "configs/gpt/debug.yaml")


@pytest.fixture(scope="session")
def gpt_run(cache_dir, tmp_path_factory):
    """A tiny GPT run with checkpoints at steps 10, 20, 30, tracked in a local MLflow store."""
    from tests.conftest import make_corpus

    root = tmp_path_factory.mktemp("evalrun")
    corpus = make_corpus(root / "corpus")
    uri = f"sqlite:///{root}/mlflow.db"
    run_cli(["train", PRESET, "--run-dir", str(root / "run"), *sets(
        *TINY, f"data.source={corpus}", "train.steps=30", "train.global_batch_size=8",
        "checkpoint.every=10", "checkpoint.keep_last=null", "tracking.enabled=true",
        f"tracking.uri={uri}")], cache_dir)
    return root, corpus, uri
