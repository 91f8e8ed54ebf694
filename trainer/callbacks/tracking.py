"""MLflow tracking (rank 0 only): parameters, per-step metrics, the resolved config.

With no ``tracking.uri`` MLflow uses its local default store (``mlflow.db`` in the working
directory): ``mlflow ui`` started there shows the runs. Runs that start together on one machine
take turns creating that store (a lock file beside it). On a cluster point ``tracking.uri`` at
a tracking server; many concurrent jobs should not share one SQLite file on a network disk.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import queue
import threading
from pathlib import Path
from typing import Any

from trainer.loop import Callback, Trainer

RUN_ID_FILE = "mlflow_run_id"
CLOSE_TIMEOUT_S = 120.0
"""How long the end of a run waits for the tracking thread to write what is queued."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def store_lock():
    """Serialise the first touches of a local SQLite store between processes: runs started
    together (a Slurm array, a sweep) would otherwise all try to create its tables at once and
    crash in MLflow's migrations. A lock file beside the database; no-op for servers."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if missing. Runs that start together may race to
    create it: the loser takes the winner's. (Not ``mlflow.set_experiment``: when it loses that
    race it returns the experiment without making it active, and the run lands in ``Default``.)"""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def open_run(run_dir: Path, tracking, run_name: str, tags: dict[str, str] | None = None,
             record: bool = True):
    """Start (or continue) the MLflow run of a run directory: the one recorded in its
    ``mlflow_run_id``, else a new run in ``tracking.experiment`` (recorded there if ``record``).
    ``tracking``: the run's ``TrackingConfig``. Returns (active run, whether it is new)."""
    import mlflow

    if tracking.uri:
        mlflow.set_tracking_uri(tracking.uri)
    id_file = run_dir / RUN_ID_FILE
    with store_lock():
        if id_file.is_file():
            return mlflow.start_run(run_id=id_file.read_text().strip()), False
        run = mlflow.start_run(experiment_id=experiment_id(tracking.experiment), run_name=run_name,
                               tags={"run_dir": str(run_dir.resolve()), **(tags or {})})
    if record:
        id_file.write_text(run.info.run_id)
    return run, True


class MLflowTracker(Callback):
    """Rank 0 logs to MLflow from a thread of its own: MLflow's import and the run's creation
    (seconds, longer while other runs hold the store's lock) overlap the first steps instead of
    delaying them, and no step waits for a store round trip. Rows are queued in order and all
    written before ``on_train_end`` returns, or at exit when the run dies (the MLflow run then
    ends ``FAILED``). A store that fails is reported in one line and training goes on:
    ``metrics.jsonl`` holds every row either way."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._rows: queue.SimpleQueue | None = None
        self._cfg = None
        self._thread: threading.Thread | None = None
        self.outcome: dict[str, str] = {}
        """``run_id`` and ``uri`` once the run ended, or ``error``."""

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0:
            self._rows, self._cfg = queue.SimpleQueue(), trainer.cfg

    def on_step_end(self, trainer: Trainer) -> None:
        # Started after the first step: the import holds the GIL for seconds, and the first
        # step's Python would wait on it (the time to the first step is what restarts pay).
        if self._rows is not None and self._thread is None:
            self._start()
            atexit.register(self._close, "FAILED")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, args=(self._cfg, self._rows), name="mlflow", daemon=True)
        self._thread.start()

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self._rows is not None:
            self._rows.put(dict(metrics))

    def on_train_end(self, trainer: Trainer) -> None:
        if self._rows is None:
            return
        self._close("FINISHED")
        atexit.unregister(self._close)
        rows = self.run_dir / "metrics.jsonl"
        if "error" in self.outcome:
            print(f"MLflow tracking failed: {self.outcome['error']}; every row is in {rows}", flush=True)
        elif "uri" not in self.outcome:
            print(f"MLflow tracking still writing after {CLOSE_TIMEOUT_S:.0f} s (a slow store?); every "
                  f"row is in {rows}", flush=True)
        else:
            uri = self.outcome["uri"]
            print(f"MLflow run {self.outcome['run_id']} in {uri} (view: mlflow ui --backend-store-uri {uri})")

    def _close(self, status: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Let the thread write what is queued and end the run with ``status``."""
        if self._rows is None:
            return
        if self._thread is None:  # ended before its first step: the run is still recorded
            self._start()
        self._rows.put(status)
        self._thread.join(timeout_s)
        self._rows = None

    def _work(self, cfg, rows: queue.SimpleQueue) -> None:
        try:
            import mlflow

            # A resumed run continues the same MLflow run.
            run, new = open_run(self.run_dir, cfg.tracking, cfg.name, cfg.tracking.tags)
            if new:
                mlflow.log_params(flatten(cfg.model_dump(mode="json")))
                mlflow.log_text(cfg.to_yaml(), "config.yaml")
            while isinstance(row := rows.get(), dict):
                mlflow.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            mlflow.end_run(status=row)
            self.outcome = {"run_id": run.info.run_id, "uri": mlflow.get_tracking_uri()}
        except Exception as e:  # the store: a wrong URI, a server gone, a full disk
            self.outcome = {"error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
            while isinstance(rows.get(), dict):
                pass  # drain until the end: rows keep coming from the training thread
