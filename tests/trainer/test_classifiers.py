"""The classifier families (recursive Tree-LSTM, sequential LSTM/Transformer) on ListOps through
the real trainer: they learn, their checkpoints answer ``eval`` and ``generate`` consistently with
the expressions' own values, a resumed run equals an uninterrupted one, two data-parallel
processes give the single-process losses under every ZeRO stage, and bad input is one line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    REPO,
    assert_resume_is_exact,
    assert_two_processes_match_one,
    read_metrics,
    run_cli,
    sets,
)
from trainer.config import load_config
from trainer.data import listops

TREE = str(REPO / "configs/listops/tree-lstm-debug.yaml")
SEQ = str(REPO / "configs/listops/lstm-debug.yaml")
SMALL = ["data.num_pairs=600", "tracking.enabled=false", "train.log_every=1", "eval.every=0",
         "checkpoint.every=0"]


@pytest.fixture(scope="module")
def trained_tree(tmp_path_factory, cache_dir):
    """The Tree-LSTM debug preset, a little wider and longer: it has learned something."""
    run = tmp_path_factory.mktemp("tree") / "run"
    uri = f"sqlite:///{run.parent}/mlflow.db"
    args = ["data.num_pairs=3000", "model.d_model=64", "train.steps=300", "train.log_every=50",
            "eval.every=150", "eval.batches=6", "checkpoint.every=150", "tracking.enabled=true",
            f"tracking.uri={uri}", "tracking.experiment=listops"]
    run_cli(["train", TREE, "--run-dir", str(run), *sets(*args)], cache_dir)
    return run, uri


def test_the_tree_lstm_learns_listops_and_logs_accuracy_to_mlflow(trained_tree):
    run, uri = trained_tree
    _, evals = read_metrics(run)
    assert [e["step"] for e in evals] == [150, 300]
    # Chance is about 0.1 (ten values, near uniform).
    assert evals[-1]["val_accuracy"] > 0.4, evals
    import mlflow

    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history((run / "mlflow_run_id").read_text(), "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(e["step"], pytest.approx(e["val_accuracy"])) for e in evals]


def test_eval_and_generate_agree_with_the_expressions_values(trained_tree, cache_dir):
    """``eval --split test``'s accuracy is the share of test expressions whose ``generate``
    answer is the value the expression evaluates to."""
    run, _ = trained_tree
    res = json.loads(run_cli(["eval", str(run / "checkpoints/step_00000300"), "--split", "test", "--json"],
                             cache_dir).stdout)
    cfg = load_config(run / "config.yaml")
    trees, labels = listops.read_splits(cfg.data, cfg.train.seed)["test"]
    assert res["examples"] == len(trees) > 50
    assert labels == [t.value() for t in trees]
    exprs = run.parent / "test.txt"
    exprs.write_text("".join(t.text() + "\n" for t in trees))
    out = run_cli(["generate", str(run), "--input", str(exprs), "--expression", "[SM 9 [MAX 4 7 ] ]"],
                  cache_dir).stdout.splitlines()
    assert out[0].split("\t")[0] == "[SM 9 [MAX 4 7 ] ]"
    answers = [line.split("\t") for line in out[1:]]
    assert [a for a, _ in answers] == [t.text() for t in trees]
    right = sum(int(v) == t.value() for (_, v), t in zip(answers, trees, strict=True))
    assert res["accuracy"] == pytest.approx(right / len(trees))


@pytest.mark.parametrize("preset,extra", [(TREE, []), (SEQ, ["model.encoder=transformer", "model.dropout=0.1"])],
                         ids=["tree_lstm", "transformer"])
def test_a_resumed_run_equals_an_uninterrupted_one(preset, extra, cache_dir, tmp_path):
    args = [*SMALL, *extra, "train.steps=8", "checkpoint.every=4"]
    assert_resume_is_exact(preset, args, 4, 8, cache_dir, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("preset,extra,zero", [
    (TREE, [], 1), (TREE, [], 2), (TREE, ["model.cell=binary_lstm"], 3),
    (SEQ, [], 2), (SEQ, ["model.encoder=transformer"], 3)], ids=["tree-z1", "tree-z2", "binary-tree-z3", "lstm-z2",
                                                               "transformer-z3"])
def test_two_process_data_parallel_matches_one_process(preset, extra, zero, cache_dir, tmp_path):
    args = [*SMALL, *extra, "train.steps=5", "train.micro_batch_size=8", "train.global_batch_size=16",
            f"parallel.zero_stage={zero}", "eval.every=5", "eval.batches=4"]
    one_eval, two_eval = assert_two_processes_match_one(preset, args, 5, cache_dir, tmp_path)
    assert two_eval[0]["val_accuracy"] == one_eval[0]["val_accuracy"]
    assert two_eval[0]["val_loss"] == pytest.approx(one_eval[0]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("setting,needle", [
    ("parallel.tp=2", "tensor parallelism is available for model.family"),
    ("parallel.pp=2", "pipeline parallelism is available for model.family"),
    ("data.source=stdlib", "set data.source to 'listops'"),
    ("model.n_classes=5", "has 10 classes but model.n_classes=5"),
])
def test_settings_a_classifier_cannot_take_are_one_line(setting, needle, cache_dir, tmp_path):
    p = run_cli(["train", TREE, "--run-dir", str(tmp_path / "r"), *sets(*SMALL, setting)], cache_dir,
                check=False)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr


@pytest.mark.parametrize("line,needle", [
    ("[MAX 1 2 ]\n[MIN 3 [SM 4 5 ]\n", "bad.tsv:2: 1 list(s) left open"),
    ("[MAX 1 2 ]\n[MAX 1 2 ] ]\n", "bad.tsv:2: unbalanced ']'"),
    ("7\t[MAX 1 2 ]\n", "bad.tsv:1: label '7' is not the expression's value 2"),
    ("[MAX 1 x ]\n", "bad.tsv:1: unknown token 'x'"),
])
def test_a_malformed_listops_file_names_its_line(line, needle, cache_dir, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(line)
    p = run_cli(["train", TREE, "--run-dir", str(tmp_path / "r"), *sets(*SMALL, f"data.source={bad}")],
                cache_dir, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(needle) or needle in p.stderr.strip().splitlines()[-1]
    assert "Traceback" not in p.stderr


def test_a_listops_file_trains_with_its_own_test_file(cache_dir, tmp_path):
    """Official files as the splits: all of ``data.source`` trains, ``data.val_source`` and
    ``data.test_source`` score."""
    train = listops.generate(200, seed=1)
    (tmp_path / "train.tsv").write_text("".join(f"{t.value()}\t{t.text()}\n" for t in train))
    (tmp_path / "test.txt").write_text("".join(t.text() + "\n" for t in listops.generate(40, seed=2)))
    args = [*SMALL, f"data.source={tmp_path / 'train.tsv'}", f"data.val_source={tmp_path / 'test.txt'}",
            f"data.test_source={tmp_path / 'test.txt'}", "train.steps=2", "checkpoint.every=2"]
    run_cli(["train", TREE, "--run-dir", str(tmp_path / "r"), *sets(*args)], cache_dir)
    res = json.loads(run_cli(["eval", str(tmp_path / "r/checkpoints/step_00000002"), "--split", "test", "--json"],
                             cache_dir).stdout)
    assert res["examples"] == 40
