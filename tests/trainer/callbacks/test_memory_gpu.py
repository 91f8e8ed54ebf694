"""Device-memory figures on a GPU: allocated and reserved peaks per phase in ``memory.json``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, TINY, make_corpus, run_cli, sets

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_memory_json_has_allocated_and_reserved_peaks_on_the_device(cache_dir, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    run_cli(["train", str(REPO / "configs/gpt/debug.yaml"), "--run-dir", str(run),
             *sets(*TINY, f"data.source={corpus}", "train.steps=3", "model.d_model=256", "model.n_head=4")],
            cache_dir)
    (row,) = json.loads((run / "memory.json").read_text())
    blocks_mb = 2 * 12 * 256 * 256 * 4 / 2**20  # the two blocks' fp32 matrices: a lower bound
    for phase in ("init", "engine", "train"):
        assert row[f"{phase}_peak_reserved_mb"] >= row[f"{phase}_peak_mb"] > 0, (phase, row)
    assert row["train_peak_mb"] > blocks_mb
