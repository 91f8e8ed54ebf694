"""MLflow tracking (rank 0 only): parameters, per-step metrics, the resolved config.

With no ``tracking.uri`` MLflow uses its local default store (``mlflow.db`` in the working
directory): ``mlflow ui`` started there shows the runs. On a cluster point ``tracking.uri`` at a
tracking server; many concurrent jobs should not share one SQLite file on a network disk.
"""

from __future__ import annotations

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


class MLflowTracker(Callback):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.active = False

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.is_rank0:
            return
        import mlflow

        t = trainer.cfg.tracking
        if t.uri:
            mlflow.set_tracking_uri(t.uri)
        mlflow.set_experiment(t.experiment)
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            # A resumed run continues the same MLflow run.
            mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            run = mlflow.start_run(run_name=trainer.cfg.name)
            id_file.write_text(run.info.run_id)
            mlflow.log_params(flatten(trainer.cfg.model_dump(mode="json")))
            mlflow.log_text(trainer.cfg.to_yaml(), "config.yaml")
            mlflow.set_tags({"run_dir": str(self.run_dir.resolve()), **t.tags})
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
