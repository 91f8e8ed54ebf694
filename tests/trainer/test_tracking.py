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
from trainer.tracking import open_run
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
