"""The one train loop: micro-batches ► engine forward/backward/step ► callbacks.

The loop itself never reads a value back from the device except at the logging cadence
(``train.log_every``): that is the only host sync point, so steps run back to back.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from trainer.callbacks import Callback
from trainer.config import Config
from trainer.data import BatchSchedule, WindowDataset
from trainer.parallel import ParallelDims


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine,
        scheduler,
        dims: ParallelDims,
        train_data: WindowDataset,
        val_data: WindowDataset,
        device: torch.device,
        flops_per_token: float,
        peak_flops: float,
        callbacks: list[Callback],
    ) -> None:
        self.cfg, self.engine, self.scheduler, self.dims = cfg, engine, scheduler, dims
        self.train_data, self.val_data, self.device = train_data, val_data, device
        t = cfg.train
        self.schedule = BatchSchedule(len(train_data), t.micro_batch_size, t.grad_accum, dims.dp, t.seed)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.callbacks = callbacks
        self.step = 0
        self.stop_reason: str | None = None
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len

    @property
    def is_rank0(self) -> bool:
        return self.dims.rank == 0

    # ---------------------------------------------------------------- state

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed does not save itself: position in the data and RNG states."""
        return {
            "step": self.step,
            "samples_consumed": self.step * self.schedule.global_batch,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_client_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ---------------------------------------------------------------- steps

    def _batch(self, data: WindowDataset, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in data.batch(indices).items()}

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.cfg.train.grad_accum):
            batch = self._batch(self.train_data, self.schedule.micro_batch(self.step, micro, self.dims.dp_rank))
            loss = self.engine(**batch)
            # DeepSpeed scales by 1/grad_accum, skips the gradient all-reduce until the last
            # micro-step, and only runs the optimizer at the accumulation boundary.
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach()
        return loss_sum / self.cfg.train.grad_accum

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed slice of validation windows, sharded across dp ranks."""
        self.engine.eval()
        mb, n = self.cfg.train.micro_batch_size, len(self.val_data)
        total = torch.zeros((), device=self.device)
        for b in range(self.cfg.eval.batches):
            first = (b * self.dims.dp + self.dims.dp_rank) * mb
            idx = np.arange(first, first + mb) % n
            total += self.engine(**self._batch(self.val_data, idx)).float()
        self.engine.train()
        # Collective + host sync: every rank evaluates the same number of batches.
        return float(self.dims.dp_mean(total / self.cfg.eval.batches))

    def stop(self, reason: str) -> None:
        """Finish after the current step (callbacks' end hooks still run: a checkpoint is saved)."""
        self.stop_reason = reason

    def log(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        steps, every = self.cfg.train.steps, self.cfg.train.log_every
        t_last, step_last = time.perf_counter(), self.step
        while self.step < steps and self.stop_reason is None:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps after)
            loss = self.train_step()
            self.step += 1
            if self.step % every == 0 or self.step == steps:
                # Host sync point: the all-reduce and .item() wait for the step to finish.
                mean_loss = float(self.dims.dp_mean(loss))
                now = time.perf_counter()
                tok_s = (self.step - step_last) * self.tokens_per_step / (now - t_last)
                t_last, step_last = now, self.step
                gn = self.engine.get_global_grad_norm()
                self.log({
                    "step": self.step,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": None if gn is None else float(gn),
                    "tokens_per_s": tok_s,
                    "mfu": tok_s / self.dims.world_size * self.flops_per_token / self.peak_flops,
                    "tokens": self.step * self.tokens_per_step,
                    "epoch": self.schedule.epoch_of(self.step),
                })
            for cb in self.callbacks:
                cb.on_step_end(self)
        for cb in self.callbacks:
            cb.on_train_end(self)
