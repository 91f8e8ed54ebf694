"""MLflow tracking (rank 0 only): parameters, per-step metrics, the resolved config.

With no ``tracking.uri`` MLflow uses its local default store (``mlflow.db`` in the working
directory): ``mlflow ui`` started there shows the runs. Runs that start together on one machine
take turns creating that store (a lock file beside it). On a cluster point ``tracking.uri`` at
a tracking server; many concurrent jobs should not share one SQLite file on a network disk.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.callbacks import Callback

if TYPE_CHECKING:
    from trainer.loop import Trainer

RUN_ID_FILE = "mlflow_run_id"


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
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.active = False

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.is_rank0:
            return
        import mlflow

        # A resumed run continues the same MLflow run.
        _, new = open_run(self.run_dir, trainer.cfg.tracking, trainer.cfg.name, trainer.cfg.tracking.tags)
        if new:
            mlflow.log_params(flatten(trainer.cfg.model_dump(mode="json")))
            mlflow.log_text(trainer.cfg.to_yaml(), "config.yaml")
        self.active = True

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            step = metrics["step"]
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.active:
            import mlflow

            run = mlflow.active_run()
            uri = mlflow.get_tracking_uri()
            mlflow.end_run()
            print(f"MLflow run {run.info.run_id} in {uri} (view: mlflow ui --backend-store-uri {uri})")
