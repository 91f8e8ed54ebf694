"""The one train loop: micro-batches ► train module step ► callbacks.

``Trainer`` knows the schedule (steps, logging cadence, evaluation slice, stopping) and nothing
of the engine: a train module (``trainer/engine/train_module.py``) runs each step. Optional behaviour
(metrics file, progress bar, evaluation, checkpoints, signals, tracking) lives in callbacks:
``Callback`` below names the hooks, ``trainer/callbacks/`` holds one module per behaviour.

Host syncs: none in a step. At the logging cadence (``train.log_every``) the loss and token
count are all-reduced and read, the non-finite guard's counts (``trainer/engine/nonfinite.py``)
are read and the run stopped after too many skipped updates in a row, and the stop-signal
check (``trainer/callbacks/preemption.py``) agrees across ranks; besides, once at the first
step's end (the start-up line), at evaluation and at saves. ``tests/trainer/test_host_syncs.py``
counts them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from trainer.accounting import comm
from trainer.config import Config
from trainer.data.build import Data
from trainer.data.prefetch import Prefetcher
from trainer.startup import Stopwatch


def sdpa_context(backend: str):
    """The attention-kernel choice as a context manager (``auto``: torch's own choice)."""
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend])


class Callback:
    def on_load(self, trainer: Trainer) -> None:
        """Before ``on_train_start`` of any callback: restore state (the checkpoint callback
        resumes here, so every train-start hook sees the restored step)."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        """What this callback needs to go on after a resume exactly as without one (saved in
        the checkpoint's client state under the class name; called on every rank at a save)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (at a resume or a rewind)."""


class Trainer:
    def __init__(self, cfg: Config, module, data: Data, callbacks: list[Callback],
                 clock: Stopwatch | None = None,
                 evaluators: Sequence[Callable[[Trainer], dict[str, float]]] = ()) -> None:
        """``module``: a train module; ``data``: the batches (``trainer.data.build``);
        ``callbacks``: hooks run in list order; ``clock``: the start-up laps so far (the first
        logged row and a log line get the time to the first step); ``evaluators``: metrics
        computed with the validation loss (``trainer/evaluation/decode.py``), each a collective."""
        self.cfg, self.module, self.data, self.callbacks = cfg, module, data, callbacks
        self.evaluators = list(evaluators)
        self.clock = clock
        self.dims, self.device = module.dims, module.device
        self.step = 0
        self.tokens_seen = 0
        self.stop_reason: str | None = None
        self.diverged = False
        self.prefetcher = None
        self.skips: list[tuple[int, int]] = [tuple(r) for r in cfg.train.skip_data_steps]
        """Data steps never trained on (inclusive, from 1): ``train.skip_data_steps`` and rewinds."""
        self.last_loss: torch.Tensor | None = None
        """The last step's mean loss on this rank, on the device (read by callbacks at the cadence)."""
        self._said_eval_cap = False
        self._logged_step = 0
        self._comm: dict[str, dict[str, int]] = {}  # collectives of the steps since the last row
        self.startup: dict[str, float] = {}
        """Start-up laps for the next logged row (only the first)."""

    @property
    def is_rank0(self) -> bool:
        return self.dims.rank == 0

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What the engine does not save itself: position in the data and RNG states, and the
        module's counters (the same on every rank)."""
        schedule = getattr(self.data.train, "schedule_state", None)  # a mixture's segments
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            **({"data_schedule": schedule()} if schedule else {}),
            **self.module.state_dict(),
            "callbacks": {type(cb).__name__: state for cb in self.callbacks if (state := cb.state_dict()) is not None},
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.module.load_state_dict(state)
        schedule = getattr(self.data.train, "load_schedule_state", None)
        if schedule:
            # Segments are indexed by data step (skipped ones included), as batches are.
            schedule(state.get("data_schedule"), self.data_index(self.step), self.cfg.data.allow_mixture_change)
        saved = state.get("callbacks", {})  # (absent in checkpoints from before callbacks had state)
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        # Older checkpoints also hold rank 0's generators of every visible GPU under "cuda":
        # ignored, since each rank's own generator lives in its rank state.

    def rank_state(self) -> dict[str, Any] | None:
        """State that differs per rank, saved in a file per rank: the carried recurrent states
        of truncated BPTT, and this rank's own CUDA generator (dropout masks: each rank's
        advanced on its own, and a rank sees only its device after a restart)."""
        fn = getattr(self.data.train, "state_dict", None)
        state = {"data": fn()} if fn else {}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state or None

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if "data" not in state and "cuda_rng" not in state:
            state = {"data": state}  # saved before the CUDA generator joined it
        if "data" in state:
            self.data.train.load_state_dict(state["data"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # ---------------------------------------------------------------- steps

    def data_index(self, step: int) -> int:
        """The data step (from 0) that loop step ``step`` (from 0) reads: the ``step``-th one not
        skipped. Batches are a pure function of it, so a skip shifts every later step's batch."""
        d = step
        for first, last in sorted(self.skips):
            if first - 1 <= d:
                d += last - first + 1
        return d

    def restart_data(self) -> None:
        """After the step or the skips changed (a rewind): read ahead from the new position."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = self._prefetcher()
        self._logged_step = self.step

    def _prefetcher(self) -> Prefetcher | None:
        # Stateful batches (truncated BPTT) need the previous output: no reading ahead there.
        if not self.cfg.data.prefetch or hasattr(self.data.train, "after_forward"):
            return None
        return Prefetcher(self.data.train, self.dims.dp_rank, self.cfg.train.grad_accum, self.step,
                          self.cfg.train.steps, index_of=self.data_index)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step: (mean loss, target tokens), on the device."""
        if self.prefetcher is not None:
            source, index = self.prefetcher, self.step  # the prefetcher maps steps to data itself
        else:
            source, index = self.data.train, self.data_index(self.step)
        micro = (source.micro_batch(index, m, self.dims.dp_rank) for m in range(self.cfg.train.grad_accum))
        counter = comm.counter()
        if counter is not None:
            counter.take()  # what ran between steps (evaluation, saves, logging) is not the step's
        with sdpa_context(self.cfg.train.sdpa_backend):
            out = self.module.train_batch(micro, getattr(self.data.train, "after_forward", None))
        if counter is not None:
            for key, v in counter.take().items():
                acc = self._comm.setdefault(key, {"calls": 0, "bytes": 0})
                acc["calls"] += v["calls"]
                acc["bytes"] += v["bytes"]
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over a fixed slice of ``eval.batches`` validation micro-batches, shared out
        across dp ranks (the same slice for every layout), plus the data's extra evaluations
        (decoding metrics of sequence-to-sequence models)."""
        self.module.eval()
        parts = getattr(self.data.val, "parts", None)  # a mixture: (name, weight, batches) per source
        if parts is None:
            metrics = {"val_loss": self._eval_loss(self.data.val)}
        else:
            losses = {f"val_loss/{name}": self._eval_loss(val) for name, _, val in parts}
            total = sum(w for _, w, _ in parts)
            mixed = sum(w * losses[f"val_loss/{name}"] for name, w, _ in parts) / total
            metrics = {"val_loss": mixed, **losses}
        for fn in self.evaluators:
            metrics.update(fn(self))
        self.module.train()
        return metrics

    def eval_slice(self, val) -> tuple[list, int, int]:
        """This rank's share of ``val``'s evaluation slice: (its batches, how many of the first
        of them count, the slice's batch count over all ranks). Rank r takes global batches r,
        r + dp, ...; every rank runs the same count (ZeRO-3 gathers collectively), a surplus
        one counted nowhere."""
        n, dp, rank = self._eval_count(val), self.dims.dp, self.dims.dp_rank
        rounds = -(-n // dp)
        counted = sum(b * dp + rank < n for b in range(rounds))
        return list(val.eval_batches(rank, dp, rounds)), counted, n

    def _eval_loss(self, val) -> float:
        """Mean loss over ``val``'s evaluation slice."""
        batches, counted, n = self.eval_slice(val)
        total = self.module.eval_loss_sum(batches, counted, getattr(val, "after_eval_forward", None))
        return float(self.dims.dp_mean(total)) * self.dims.dp / n  # collective + host sync

    def _eval_count(self, val) -> int:
        """``eval.batches``, or fewer where the validation split holds fewer (a multiple of dp):
        each window counts once, not the split's head twice."""
        n, dp = self.cfg.eval.batches, self.dims.dp
        cap = getattr(val, "eval_capacity", None)
        if cap is None or n <= cap or cap < dp:
            return n
        if not self._said_eval_cap and self.is_rank0:
            print(f"eval.batches={n} is more than the validation split holds: evaluating its "
                  f"{cap // dp * dp} batches, each once", flush=True)
            self._said_eval_cap = True
        return cap // dp * dp

    def at_sync_point(self) -> bool:
        """Whether the step just finished is one where the host reads the device: the logging
        cadence and the last step."""
        return self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps

    def _check_divergence(self) -> None:
        """Stop once ``train.nonfinite_patience`` updates in a row were skipped (checked at the
        logging cadence; the run may have gone on skipping since it reached the patience).

        fp16 overflows do not count: halving the loss scale until gradients fit is the scaler's
        normal work (DeepSpeed stops by itself at the minimum scale).
        """
        k = self.cfg.train.nonfinite_patience
        run = self.module.nonfinite_run() if k else 0  # host sync
        if k and run >= k:
            self.diverged = True
            self.stop(f"{run} consecutive steps with non-finite gradients; the weights are those of "
                      f"step {self.step - run}, before them")

    def stop(self, reason: str) -> None:
        """Finish after the current step (callbacks' end hooks still run: a checkpoint is saved)."""
        self.stop_reason = reason

    def log(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_log(self, metrics)

    def _train_row(self, loss: torch.Tensor, tokens: torch.Tensor, lr: float, since: float) -> dict[str, Any]:
        """The logged row of this step; ``tokens``: target tokens since the last row, which was
        logged at time ``since``."""
        # Host sync point: the all-reduces and float() wait for the step to finish.
        mean_loss = float(self.dims.dp_mean(loss))
        n_tokens = int(round(float(self.dims.dp_mean(tokens.float())) * self.dims.dp))
        self.tokens_seen += n_tokens
        tok_s = n_tokens / (time.perf_counter() - since)
        steps = self.step - self._logged_step
        self._logged_step = self.step
        traffic = comm.per_step(self._comm, steps) if self._comm else {}
        self._comm = {}
        read = self.data_index(self.step - 1) + 1  # data steps read so far, skipped ones included
        return {
            "step": self.step,
            "loss": mean_loss,
            "lr": lr,
            "tokens_per_s": tok_s,
            "mfu": self.module.mfu(tok_s / self.dims.world_size),
            "tokens": self.tokens_seen,
            "epoch": self.data.train.epoch_of(read),
            **(self.data.train.metrics(read) if hasattr(self.data.train, "metrics") else {}),
            **self.module.step_metrics(),
            **traffic,  # this rank's collectives per step (trainer/accounting/comm.py)
        }

    def _lap(self, name: str) -> None:
        if self.clock is not None:
            self.clock.lap(name)

    def _first_step_done(self) -> None:
        """After the first step of this process: its start-up into the log and the first row."""
        if self.clock is None:
            return
        self._lap("first_step")
        if self.is_rank0:
            print(self.clock.line(), flush=True)
        self.startup, self.clock = self.clock.metrics(), None

    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_load(self)
        self._lap("resume")
        for cb in self.callbacks:
            cb.on_train_start(self)
        self._lap("callbacks")  # tracking (MLflow) set-up, mostly
        self.prefetcher = self._prefetcher()
        steps = self.cfg.train.steps
        t_last, tokens_window = time.perf_counter(), torch.zeros((), device=self.device, dtype=torch.long)
        self._logged_step = self.step
        while self.step < steps and self.stop_reason is None:
            for cb in self.callbacks:
                cb.on_step_start(self)
            lr = self.module.lr()
            loss, tokens = self.train_step()
            self.last_loss = loss
            tokens_window += tokens
            self.step += 1
            if self.clock is not None:
                float(loss)  # the first step's end, once: a host sync
                self._first_step_done()
            if self.at_sync_point():
                self._check_divergence()
                row = self._train_row(loss, tokens_window, lr, since=t_last)
                t_last, tokens_window = time.perf_counter(), torch.zeros_like(tokens_window)
                self.log({**row, **self.startup})
                self.startup = {}
            for cb in self.callbacks:
                cb.on_step_end(self)
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        for cb in self.callbacks:
            cb.on_train_end(self)

