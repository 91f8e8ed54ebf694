"""``metrics.jsonl``: every logged row of a run, train and evaluation alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.loop import Callback, Trainer


class MetricsFile(Callback):
    """``metrics.jsonl``: one JSON object per logged step (train rows and eval rows)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0 and self.path.exists():
            # Resuming: rows past the restored step belong to a timeline that no longer exists.
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= trainer.step]
            self.path.write_text("".join(r + "\n" for r in kept))

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.is_rank0:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")

