"""Runs started at the same moment against a fresh local MLflow store (a Slurm array, a sweep)
all get their MLflow run: the store's creation is taken in turns."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

OPEN_RUN = """
import sys
from pathlib import Path
import mlflow
from trainer.config import TrackingConfig
from trainer.callbacks.tracking import open_run
run_dir = Path(sys.argv[1]); run_dir.mkdir()
open_run(run_dir, TrackingConfig(uri=sys.argv[2], experiment="together"), run_dir.name)
mlflow.log_metric("loss", 1.0, step=1)
mlflow.end_run()
"""


def test_eight_runs_started_together_on_a_fresh_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_RUN, str(tmp_path / f"run{i}"), uri], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    failed = [err.strip().splitlines()[-1] for code, err in results if code != 0]
    assert not failed, failed
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted((tmp_path / f"run{i}" / "mlflow_run_id").read_text() for i in range(8))
    assert all(r.data.metrics["loss"] == 1.0 for r in runs)


# A run that dies: its tracker's rows were queued for the background thread; they must still
# reach the store (written at exit) and the MLflow run must end FAILED.
DYING = """
import sys
from pathlib import Path
from types import SimpleNamespace
from trainer.config import Config
from trainer.callbacks.tracking import MLflowTracker
run_dir = Path(sys.argv[1]); run_dir.mkdir()
trainer = SimpleNamespace(is_rank0=True, cfg=Config.model_validate(
    {"name": "dies", "tracking": {"uri": sys.argv[2], "experiment": "dying"}}))
tracker = MLflowTracker(run_dir)
tracker.on_train_start(trainer)
for step in range(1, 41):
    tracker.on_step_end(trainer)
    tracker.on_log(trainer, {"step": step, "loss": 1.0 / step})
raise RuntimeError("the run dies here")
"""


def test_rows_of_a_run_that_dies_still_reach_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = subprocess.run([sys.executable, "-c", DYING, str(tmp_path / "run"), uri], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "the run dies here" in p.stderr
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(s, 1.0 / s) for s in range(1, 41)]


def test_a_store_that_fails_is_one_line_and_training_goes_on(tiny_corpus, cache_dir, tmp_path):
    from tests.conftest import TINY, read_metrics, run_cli, sets

    run_dir = tmp_path / "run"
    p = run_cli(["train", "configs/gpt/debug.yaml", "--run-dir", str(run_dir), *sets(
        *TINY, f"data.source={tiny_corpus}", "train.steps=6", "tracking.enabled=true",
        "tracking.uri=sqlite:////proc/no-such-dir/mlflow.db")], cache_dir)
    failed = [line for line in p.stdout.splitlines() if line.startswith("MLflow tracking failed: ")]
    assert len(failed) == 1 and str(run_dir / "metrics.jsonl") in failed[0]
    assert [r["step"] for r in read_metrics(run_dir)[0]] == list(range(1, 7))
