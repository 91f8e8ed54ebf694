"""The one train loop: micro-batches ► engine forward/backward/step ► callbacks.

The loop itself never reads a value back from the device except at the logging cadence
(``train.log_every``): that is the only host sync point, so steps run back to back.

``batches`` objects (``trainer/data``) give ``micro_batch(step, micro, rank)``,
``eval_batches(rank, dp, n)`` and ``epoch_of(step)``; stateful ones (truncated BPTT) also take
the model's output back (``after_forward``) and save per-rank state with each checkpoint.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from trainer.callbacks import Callback
from trainer.config import Config
from trainer.parallel import ParallelDims


def sdpa_context(backend: str):
    """The attention-kernel choice as a context manager (``auto``: torch's own choice)."""
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend])


def _loss(out) -> torch.Tensor:
    """Models return the loss, or (loss, recurrent state) for RNN language models."""
    return out[0] if isinstance(out, tuple) else out


class Trainer:
    def __init__(
        self,
        cfg: Config,
        engine,
        scheduler,
        dims: ParallelDims,
        train_batches,
        val_batches,
        device: torch.device,
        flops_per_token: float,
        peak_flops: float,
        callbacks: list[Callback],
    ) -> None:
        self.cfg, self.engine, self.scheduler, self.dims = cfg, engine, scheduler, dims
        self.train_batches, self.val_batches, self.device = train_batches, val_batches, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.callbacks = callbacks
        self.step = 0
        self.tokens_seen = 0
        self.stop_reason: str | None = None
        self.diverged = False
        self._skipped_before = 0  # skipped updates of the run before this process resumed it
        self._skipped_seen = 0
        self._consecutive_skips = 0
        self.extra_eval: list = []  # functions (trainer) -> dict of metrics, run at each evaluation
        self.prefetcher = None

    @property
    def is_rank0(self) -> bool:
        return self.dims.rank == 0

    # ---------------------------------------------------------------- state

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed does not save itself: position in the data and RNG states."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_client_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self._skipped_before = self._skipped_seen = int(state.get("skipped_steps", 0))
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def rank_state(self) -> dict[str, Any] | None:
        """State that differs per rank (carried recurrent states), saved in a file per rank."""
        fn = getattr(self.train_batches, "state_dict", None)
        return fn() if fn else None

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.train_batches.load_state_dict(state)

    # ---------------------------------------------------------------- steps

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches: (mean loss, target tokens), on device."""
        if self.dims.pp > 1:
            return self._pipeline_step()
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device, dtype=torch.long)
        after = getattr(self.train_batches, "after_forward", None)
        source = self.prefetcher or self.train_batches
        for micro in range(self.cfg.train.grad_accum):
            batch = self._to_device(source.micro_batch(self.step, micro, self.dims.dp_rank))
            out = self.engine(**batch)
            if after is not None:
                after(micro, out)
            loss = _loss(out)
            # DeepSpeed scales by 1/grad_accum, skips the gradient all-reduce until the last
            # micro-step, and only runs the optimizer at the accumulation boundary.
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach()
            tokens += (batch["labels"] != -100).sum()
        return loss_sum / self.cfg.train.grad_accum, tokens

    def _pipeline_micro_batches(self, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Every stage builds the same micro-batches (the sampler is a pure function of the step):
        # the first stage reads the inputs, the last the labels.
        return [(b["input_ids"].to(self.device), b["labels"].to(self.device)) for b in batches]

    def _pipeline_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline engine runs all micro-batches of the step on its schedule (1F1B) and
        returns the loss averaged over them and over data-parallel replicas."""
        source = self.prefetcher or self.train_batches
        micro = self._pipeline_micro_batches(
            source.micro_batch(self.step, m, self.dims.dp_rank) for m in range(self.cfg.train.grad_accum))
        loss = self.engine.train_batch(data_iter=iter(micro))
        tokens = sum((labels != -100).sum() for _, labels in micro)
        return loss.detach().to(self.device), tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over a fixed slice of ``eval.batches`` validation micro-batches, shared out
        across dp ranks (the same slice for every layout), plus any extra evaluations
        (decoding metrics of sequence-to-sequence models)."""
        self.engine.eval()
        n, dp, rank = self.cfg.eval.batches, self.dims.dp, self.dims.dp_rank
        # Rank r takes global batches r, r + dp, ...; every rank runs the same count (ZeRO-3
        # gathers parameters collectively in forward), a surplus one weighted zero.
        rounds = -(-n // dp)
        total = torch.zeros((), device=self.device)
        batches = self.val_batches.eval_batches(rank, dp, rounds)
        if self.dims.pp > 1:  # n is a multiple of dp here (Config.resolve)
            micro = self._pipeline_micro_batches(batches)
            # The mean over the micro-batches, broadcast to every stage.
            mean = self.engine.eval_batch(iter(micro), num_micro_batches=rounds).float().reshape(())
            total += mean * rounds
            batches = []
        after = getattr(self.val_batches, "after_eval_forward", None)
        for b, batch in enumerate(batches):
            out = self.engine(**self._to_device(batch))
            if after is not None:
                after(out)
            if b * dp + rank < n:
                total += _loss(out).float()
        # Collective + host sync.
        metrics = {"val_loss": float(self.dims.dp_mean(total)) * dp / n}
        for fn in self.extra_eval:
            metrics.update(fn(self))
        self.engine.train()
        return metrics

    @property
    def skipped_steps(self) -> int:
        """Updates skipped over the whole run: by our guard (``trainer/nonfinite.py``) or by
        DeepSpeed itself (ZeRO's overflow check, the fp16 loss scaler); host counters."""
        guard = getattr(self.engine, "nonfinite_guard", None)
        return self._skipped_before + (guard.skipped if guard else 0) + self.engine.skipped_steps

    def _check_divergence(self) -> None:
        """Count updates skipped in a row; stop after ``train.nonfinite_patience`` of them.

        fp16 overflows do not count: halving the loss scale until gradients fit is the scaler's
        normal work (DeepSpeed stops by itself at the minimum scale).
        """
        k = self.cfg.train.nonfinite_patience
        total = self.skipped_steps
        if total > self._skipped_seen and self.cfg.train.precision != "fp16":
            self._consecutive_skips += 1
        else:
            self._consecutive_skips = 0
        self._skipped_seen = total
        if k and self._consecutive_skips >= k:
            self.diverged = True
            self.stop(f"{k} consecutive steps with non-finite gradients; the weights are those of "
                      f"step {self.step - k}, before them")

    def _loss_scale(self) -> dict[str, float]:
        """fp16: DeepSpeed's dynamic loss scale (it halves on each overflow)."""
        if self.cfg.train.precision != "fp16":
            return {}
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return {} if scale is None else {"loss_scale": float(scale)}

    def stop(self, reason: str) -> None:
        """Finish after the current step (callbacks' end hooks still run: a checkpoint is saved)."""
        self.stop_reason = reason

    def log(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        # Stateful batches (truncated BPTT) need the previous output: no reading ahead there.
        if self.cfg.data.prefetch and not hasattr(self.train_batches, "after_forward"):
            from trainer.data.prefetch import Prefetcher

            self.prefetcher = Prefetcher(self.train_batches, self.dims.dp_rank, self.cfg.train.grad_accum,
                                         self.step, self.cfg.train.steps)
        steps, every = self.cfg.train.steps, self.cfg.train.log_every
        t_last, tokens_window = time.perf_counter(), torch.zeros((), device=self.device, dtype=torch.long)
        while self.step < steps and self.stop_reason is None:
            for cb in self.callbacks:
                cb.on_step_start(self)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps after)
            with sdpa_context(self.cfg.train.sdpa_backend):
                loss, tokens = self.train_step()
            tokens_window += tokens
            self.step += 1
            self._check_divergence()  # host counters the skip checks already synced: no extra sync
            if self.step % every == 0 or self.step == steps:
                # Host sync point: the all-reduces and .item() wait for the step to finish.
                mean_loss = float(self.dims.dp_mean(loss))
                n_tokens = int(round(float(self.dims.dp_mean(tokens_window.float())) * self.dims.dp))
                self.tokens_seen += n_tokens
                now = time.perf_counter()
                tok_s = n_tokens / (now - t_last)
                t_last, tokens_window = now, torch.zeros_like(tokens_window)
                gn = self.engine.get_global_grad_norm()
                self.log({
                    "step": self.step,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": None if gn is None else float(gn),
                    "tokens_per_s": tok_s,
                    "mfu": tok_s / self.dims.world_size * self.flops_per_token / self.peak_flops,
                    "tokens": self.tokens_seen,
                    "epoch": self.train_batches.epoch_of(self.step),
                    "skipped_steps": self.skipped_steps,
                    **self._loss_scale(),
                })
            for cb in self.callbacks:
                cb.on_step_end(self)
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        for cb in self.callbacks:
            cb.on_train_end(self)
