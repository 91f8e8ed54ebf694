"""Train modules: what the loop asks of an engine, one class per engine kind.

The loop (``trainer/loop.py``) knows nothing of DeepSpeed: it hands a train module the
micro-batches of a step and gets back the mean loss and the number of target tokens, both still
on the device. The module owns the step: forward and backward over the micro-batches, gradient
clipping and its norm, the non-finite guard, the fp16 loss scale, skipped updates, the learning
rate schedule, and its part of the checkpoint. Two kinds:

- ``EngineModule``: DeepSpeed's engine (data parallelism with ZeRO 0-3, tensor parallelism
  through the ``mpu`` grid): forward/backward per micro-batch, the optimizer at the boundary;
- ``PipelineModule``: DeepSpeed's pipeline engine, which runs all micro-batches of a step on its
  own schedule (1F1B).

``mark(phase)`` is an optional hook called at phase boundaries (``data``, ``forward``,
``backward``, ``optimizer``; a pipeline has ``data`` and ``step``): the benchmark times phases
with it; the loop passes none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.loss import ZLoss
from trainer import deepspeed_private as ds_private
from trainer.accounting.flops import PeakFlops
from trainer.checkpoint.reshard import NAMES_KEY, optimizer_param_names
from trainer.parallel import ParallelDims

Batch = dict[str, Any]


def _no_mark(phase: str) -> None: ...


def model_loss(out) -> torch.Tensor:
    """Models return the loss, or (loss, recurrent state) for RNN language models."""
    return out[0] if isinstance(out, tuple) else out


def z_loss_of(model: nn.Module) -> torch.Tensor | None:
    """The mean z-loss term since the last logged row (``train.z_loss``), or None when off."""
    terms = [t for m in model.modules() if isinstance(m, ZLoss) and m.z_loss
             for t in [m.take_z_loss()] if t is not None]
    return sum(terms) if terms else None


def count_targets(batch: Batch) -> torch.Tensor:
    return (batch["labels"] != -100).sum()


class EngineModule:
    """DeepSpeed's engine: ZeRO 0-3, with tensor parallelism through the engine's ``mpu``."""

    def __init__(self, engine, scheduler, dims: ParallelDims, device: torch.device, guard=None,
                 flops_per_token: float = 0.0, peak: PeakFlops | None = None) -> None:
        self.engine, self.scheduler, self.dims, self.device = engine, scheduler, dims, device
        self.guard = guard  # trainer/engine/nonfinite.py, or None when train.nonfinite_patience is 0
        self.flops_per_token = flops_per_token
        """Training FLOPs per token of the whole model (for MFU)."""
        self.peak = peak
        self._skipped_before = 0  # skipped updates of the run before this process resumed it
        self._engine_skips = ds_private.skipped_steps(engine)  # DeepSpeed's count after the last step
        self.units: Callable[[Batch], Any] = count_targets
        """A batch's "tokens" for throughput and MFU (the family's ``units``; set by
        ``initialize``)."""
        self.before_update: list[Callable[[], None]] = []
        """Called before each optimizer update, after the step's forwards and backwards (an
        asynchronous save's fence: ``trainer/checkpoint/async_writer.py``)."""
        if engine.gradient_clipping() > 0:
            ds_private.replace_fp32_clipping(engine, self._clip_fp32_gradients)

    def _before_update(self) -> None:
        for fn in self.before_update:
            fn()

    def mfu(self, tokens_per_s_per_device: float) -> float:
        """Model FLOPs utilisation of one device (never above 1: ``trainer/accounting/flops.py``)."""
        return self.peak.mfu(tokens_per_s_per_device * self.flops_per_token) if self.peak else 0.0

    @property
    def peak_flops(self) -> float:
        return self.peak.value if self.peak else 0.0

    @property
    def model(self) -> nn.Module:
        """The module being trained (hooks, decoding and per-family settings reach it here)."""
        return self.engine.module

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_batch(self, micro_batches: Iterable[Batch], on_output: Callable | None = None,
                    mark: Callable[[str], None] = _no_mark) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches: (mean loss, target tokens), on the device
        (no host sync). ``micro_batches`` is read lazily: ``on_output(micro, out)`` (carried RNN
        states) runs before the next micro-batch is read."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for n, batch in enumerate(micro_batches, start=1):
            batch = self._to_device(batch)
            mark("data")
            out = self.engine(**batch)
            if on_output is not None:
                on_output(n - 1, out)
            loss = model_loss(out)
            mark("forward")
            # DeepSpeed scales by 1/grad_accum, skips the gradient all-reduce until the last
            # micro-step, and only runs the optimizer at the accumulation boundary.
            self.engine.backward(loss)
            mark("backward")
            if self.before_update and self.engine.is_gradient_accumulation_boundary():
                self._before_update()
            self.engine.step()
            mark("optimizer")
            loss_sum += loss.detach()
            tokens += self.units(batch)
        self._end_step()
        return loss_sum / n, tokens

    @torch.no_grad()
    def eval_loss_sum(self, batches: list[Batch], counted: int, on_output: Callable | None = None) -> torch.Tensor:
        """Sum of the losses of the first ``counted`` batches; every batch runs forward (ZeRO-3
        gathers parameters collectively, so every rank runs the same count)."""
        total = torch.zeros((), device=self.device)
        for b, batch in enumerate(batches):
            out = self.engine(**self._to_device(batch))
            if on_output is not None:
                on_output(out)
            if b < counted:
                total += model_loss(out).float()
        return total

    @torch.no_grad()
    def predict(self, batches: Iterable[Batch]) -> list[torch.Tensor]:
        """The model's output for each batch, without its labels (a classifier's logits). Every
        rank runs the same count under ZeRO-3, as ``eval_loss_sum``."""
        return [self.engine(**{k: v for k, v in self._to_device(b).items() if k != "labels"}) for b in batches]

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def lr(self) -> float:
        """The base rate the next step uses (the scheduler steps after it); under μP a group's
        own rate is this times its ``lr_mult``."""
        return self.scheduler.get_last_lr()[0] / self.scheduler.optimizer.param_groups[0].get("lr_mult", 1.0)

    def _end_step(self) -> None:
        """Tell the guard the optimizer step is over, and whether DeepSpeed skipped it first
        (its counter is a host integer: no sync)."""
        engine_skips = ds_private.skipped_steps(self.engine)
        if self.guard is not None:
            self.guard.end_step(engine_skips > self._engine_skips and not self.engine.fp16_enabled())
        self._engine_skips = engine_skips

    @property
    def skipped_steps(self) -> int:
        """Updates skipped over the whole run: by our guard or by DeepSpeed itself (ZeRO's
        overflow check, the fp16 loss scaler). Reads the guard's device count: a host sync, at
        the logging cadence and at saves."""
        guard = self.guard.skipped if self.guard is not None else 0
        return self._skipped_before + guard + ds_private.skipped_steps(self.engine)

    def nonfinite_run(self) -> int:
        """Updates skipped in a row up to the last step, fp16 loss-scaler skips not counted (a
        host sync: the loop asks at the logging cadence)."""
        return self.guard.run() if self.guard is not None else 0

    def step_metrics(self) -> dict[str, float | None]:
        """Gradient norm of the last step, skipped updates, and the fp16 loss scale."""
        gn = self.engine.get_global_grad_norm()
        out: dict[str, float | None] = {"grad_norm": None if gn is None else float(gn),
                                        "skipped_steps": self.skipped_steps}
        if self.engine.fp16_enabled():
            scale = ds_private.loss_scale(self.engine.optimizer)
            if scale is not None:
                out["loss_scale"] = scale
        z = z_loss_of(self.model)
        if z is not None:
            out["z_loss"] = float(self.dims.dp_mean(z))  # a collective at the logging cadence
        return out

    def _clip_fp32_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm on the plain fp32 path (no ZeRO, no fp16/bf16) and
        return it.

        DeepSpeed's own ``clip_grad_norm_`` drops the norm it computes, and under a pipeline
        counts replicated parameters only on stage 0's ranks. Here every parameter counts once:
        a tensor-parallel shard on each tensor rank, a replicated one on tensor rank 0, a tied
        embedding on the first stage that holds it; the squares are summed over the
        model-parallel group (pipe × tensor). Gradients are already averaged over data-parallel
        ranks here.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        counted = [p.grad for p in params if not ds_private.is_pipe_replicated(p)
                   and (self.dims.tp_rank == 0 or ds_private.is_tensor_parallel(p))]
        # Multi-tensor kernels (one pass per dtype/device group) rather than a loop per parameter.
        sq = (torch.nn.utils.get_total_norm(counted).float().pow(2) if counted
              else torch.zeros((), device=params[0].device))
        if self.dims.model_group is not None:
            torch.distributed.all_reduce(sq, group=self.dims.model_group)
        norm = sq.sqrt()
        # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when below 1.
        torch.nn.utils.clip_grads_with_norm_(params, self.engine.gradient_clipping(), norm)
        return norm

    # ---------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """What the module adds to the loop's checkpoint state (DeepSpeed saves the rest)."""
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._skipped_before = int(state.get("skipped_steps", 0)) - ds_private.skipped_steps(self.engine)
        self._engine_skips = ds_private.skipped_steps(self.engine)

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: DeepSpeed writes weights, optimizer and scheduler shards of every rank.
        Each model-parallel rank's file also names its optimizer's parameters (ZeRO 0), so the
        checkpoint can be resharded into another layout (``trainer/checkpoint/reshard.py``)."""
        client_state = {**client_state, NAMES_KEY: optimizer_param_names(self.engine)}
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        """Collective: restore weights, optimizer and scheduler; returns the saved client state."""
        _, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        return client_state


class PipelineModule(EngineModule):
    """DeepSpeed's pipeline engine: all micro-batches of a step on its schedule (1F1B), the loss
    averaged over them and over data-parallel replicas. Every stage builds the same
    micro-batches (the sampler is a pure function of the step): the first stage reads the
    inputs, the last the labels."""

    def __init__(self, engine, *args, **kwargs) -> None:
        super().__init__(engine, *args, **kwargs)
        ds_private.before_pipeline_update(engine, self._before_update)

    def _pipe_batches(self, batches: Iterable[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b["input_ids"], b["labels"]) for b in map(self._to_device, batches)]

    def train_batch(self, micro_batches: Iterable[Batch], on_output: Callable | None = None,
                    mark: Callable[[str], None] = _no_mark) -> tuple[torch.Tensor, torch.Tensor]:
        if on_output is not None:
            raise ValueError("a pipeline cannot carry state between micro-batches")
        micro = self._pipe_batches(micro_batches)
        mark("data")
        loss = self.engine.train_batch(data_iter=iter(micro))  # (its schedule calls before_update)
        mark("step")
        self._end_step()
        tokens = sum((labels != -100).sum() for _, labels in micro)
        return loss.detach().to(self.device), tokens

    @torch.no_grad()
    def eval_loss_sum(self, batches: list[Batch], counted: int, on_output: Callable | None = None) -> torch.Tensor:
        # Equal shares on every data-parallel rank (Config.resolve checks eval.batches % dp).
        assert counted == len(batches), "pipeline evaluation counts every batch"
        micro = self._pipe_batches(batches)
        # The mean over the micro-batches, broadcast to every stage.
        mean = self.engine.eval_batch(iter(micro), num_micro_batches=len(micro)).float().reshape(())
        return mean * len(micro)
