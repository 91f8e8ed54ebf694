"""The progress bar on rank 0, and the log lines printed above it."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from trainer.loop import Callback, Trainer


class ProgressBar(Callback):
    """A tqdm bar on rank 0 with the latest loss; log lines printed above it."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.is_rank0:
            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                            disable=None)  # no bar when stderr is a log file, not a terminal

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if "val_loss" in metrics or "loss" not in metrics:  # evaluation and event rows
            shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items() if k != "step")
            self.bar.write(f"step {metrics['step']:>6}  {shown}")
            return
        gn = metrics.get("grad_norm")
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        self.bar.write(
            f"step {metrics['step']:>6}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"grad_norm {gn if gn is None else f'{gn:.3f}'}  tok/s {metrics['tokens_per_s']:,.0f}  "
            f"mfu {100 * metrics['mfu']:.1f}%"
        )

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()

