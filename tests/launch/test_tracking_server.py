"""A tracking server for clusters: ``seqtrain tracking serve`` on PostgreSQL, and a scaling
ladder run as a Slurm array whose points log to it at the same time; no run is lost."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO, cli_env, run_cli
from tests.tools.test_scaling import MICRO
from trainer.distributed import free_port


@pytest.fixture
def tracking_server(postgres, cache_dir, tmp_path):
    port = free_port()
    artifacts = tmp_path / "artifacts"
    server = subprocess.Popen(
        [sys.executable, "-m", "trainer", "tracking", "serve", "--backend-store-uri", postgres,
         "--artifacts-destination", str(artifacts), "--port", str(port), "--workers", "2"],
        cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"tracking server did not start: {server.stdout.read()[-3000:]}")
    yield uri, artifacts
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slurm
def test_ladder_points_log_concurrently_to_a_postgres_backed_server(slurm, tracking_server, cache_dir, tmp_path, tiny_corpus):
    import mlflow

    uri, artifacts = tracking_server
    ladder = tmp_path / "ladder.yaml"
    text = MICRO.format(base=REPO / "configs/gpt/debug.yaml", corpus=tiny_corpus, db="unused")
    text = text.replace("budgets: [2.0e9, 6.0e9]", "budgets: [2.0e9]")
    text = text.replace("  - tracking.uri=sqlite:///unused", f"  - tracking.uri={uri}")
    ladder.write_text(text)
    plan = tmp_path / "plan"
    run_cli(["scaling", "plan", str(ladder), "--out", str(plan)], cache_dir)
    # The local Slurm node takes the three array tasks at once: they log concurrently.
    p = run_cli(["scaling", "run", str(plan), "--executor", "slurm", "--wait", "--time", "00:10:00"], cache_dir)
    assert "3 points finished" in p.stdout, p.stdout
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("micro-ladder").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    results = {float(r["loss"]) for r in csv.DictReader((plan / "results.csv").open())}
    assert {r.data.tags["ladder"] for r in runs} == {"micro-ladder"}
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert history and history[-1].value in results  # each point's final loss reached the server
        assert (artifacts / r.info.experiment_id / r.info.run_id / "artifacts" / "config.yaml").is_file()
