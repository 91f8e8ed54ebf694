"""Per-layer-group gradient norms and update/weight ratios (``train.layer_stats``) against what
they must equal: the groups' norms compose the logged global gradient norm, and each update
ratio is ‖W_s − W_{s−1}‖ / ‖W_{s−1}‖ of the checkpoints saved around step s. (Every layout of the
parity matrix logs the same values: ``tests/trainer/parallel/test_layouts.py``.)"""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, TINY, make_corpus, read_metrics, run_cli, sets
from trainer.callbacks.layer_stats import layer_group

GPT = str(REPO / "configs/gpt/debug.yaml")


def test_layer_group_names():
    assert [layer_group(n) for n in ("h.3.attn.c_attn.weight", "wte.weight", "ln_f.bias", "encoder.layers.0.ff.w",
                                     "lm_head.weight")] == ["h.3", "wte", "ln_f", "encoder.layers.0", "lm_head"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("layer_stats")
    corpus = make_corpus(root / "corpus")
    run_cli(["train", GPT, "--run-dir", str(root / "run"), *sets(
        *TINY, f"data.source={corpus}", "train.steps=6", "train.log_every=2", "train.micro_batch_size=2",
        "train.global_batch_size=4", "model.tie_embeddings=false", "checkpoint.every=1", "checkpoint.keep_last=null")],
        cache_dir)
    return root / "run", read_metrics(root / "run")[0]


def test_group_gradient_norms_compose_the_global_norm(run):
    _, rows = run
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        groups = {k: v for k, v in r.items() if k.startswith("grad_norm/")}
        assert set(groups) == {f"grad_norm/{g}" for g in ("wte", "wpe", "h.0", "h.1", "ln_f", "lm_head")}
        assert math.sqrt(sum(v * v for v in groups.values())) == pytest.approx(r["grad_norm"], rel=1e-5)


def test_update_ratios_equal_the_saved_weights_difference(run):
    from trainer.checkpoint import load_model_state

    run_dir, rows = run
    for r in rows:
        s = r["step"]
        before, after = (load_model_state(run_dir / f"checkpoints/step_{t:08d}") for t in (s - 1, s))
        sums: dict[str, list[float]] = {}
        for name, w in before.items():
            acc = sums.setdefault(layer_group(name), [0.0, 0.0])
            acc[0] += float((after[name].double() - w.double()).pow(2).sum())
            acc[1] += float(w.double().pow(2).sum())
        for group, (du, w) in sums.items():
            assert r[f"update_ratio/{group}"] == pytest.approx(math.sqrt(du / w), rel=1e-4), (s, group)
        assert 0 < r["update_ratio/h.0"] < 0.1


def test_off_logs_none(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    run_cli(["train", GPT, "--run-dir", str(tmp_path / "run"), *sets(
        *TINY, f"data.source={corpus}", "train.steps=2", "train.layer_stats=false")], cache_dir)
    rows = read_metrics(tmp_path / "run")[0]
    assert rows and not any(k.startswith(("grad_norm/", "update_ratio/")) for r in rows for k in r)
