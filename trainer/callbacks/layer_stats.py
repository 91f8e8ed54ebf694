"""Per-layer-group gradient norms and update/weight ratios, at the logging cadence
(``train.layer_stats``): ``grad_norm/h.3`` and ``update_ratio/h.3`` in each logged row.

A layer group is a parameter name up to its first number (``h.3``, ``encoder.layers.0``), else
its first part (``wte``, ``ln_f``, ``lm_head``), in single-device names whatever the layout.
``grad_norm/G`` is the L2 norm of G's gradients after the data-parallel average and before
clipping (the groups' norms compose the logged ``grad_norm``); ``update_ratio/G`` is
``‖W_after − W_before‖ / ‖W_before‖`` of the step's update.

Cost, at logging steps only: a copy of this rank's weights (its partition under ZeRO-3) taken
before the step; under ZeRO 1/2 one all-reduce per parameter to read its whole gradient
(DeepSpeed's ``safe_get_full_grad``); one all-reduce of 3 numbers per group at the row. Other
steps do nothing, so no host sync is added between rows. A pipeline's gradients are read where
its schedule reaches the optimizer step (``before_update``, after the tied-weight and
data-parallel reductions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainer import deepspeed_private as ds_private
from trainer.loop import Callback, Trainer
from trainer.parallel.materialize import reference_model
from trainer.parallel.pipeline import single_device_name


def layer_group(name: str) -> str:
    """``h.3.attn.c_attn.weight`` ► ``h.3``; ``wte.weight`` ► ``wte``."""
    parts = name.split(".")[:-1] or name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


class LayerStats(Callback):
    def on_train_start(self, trainer: Trainer) -> None:
        cfg, dims = trainer.cfg, trainer.dims
        self.zero_stage, self.world = cfg.parallel.zero_stage, dims.world_size
        whole = [n for n, p in reference_model(cfg).named_parameters() if p.requires_grad]
        self.groups = list(dict.fromkeys(layer_group(n) for n in whole))
        rename: Callable[[str], str | None] = (lambda n: single_device_name(n, cfg.model)) if dims.pp > 1 else (lambda n: n)
        index = {g: i for i, g in enumerate(self.groups)}
        # Each element counted once in the world: a tensor shard on every tensor rank, a
        # replicated weight on tensor rank 0, a pipeline-tied copy nowhere, and a weight every
        # data-parallel replica holds whole on the first replica only (ZeRO-3 partitions: on all).
        first_replica = dims.dp_rank == 0 and dims.cp_rank == 0
        self.held: list[tuple[torch.nn.Parameter, int | None]] = []
        """Every parameter of this rank in the same order on every rank (under ZeRO 1/2 reading
        a whole gradient is a collective), with its group where this rank counts it."""
        for name, p in trainer.module.model.named_parameters():
            single = rename(name)
            if not p.requires_grad or single is None:
                continue
            counted = (not ds_private.is_pipe_replicated(p) and (dims.tp_rank == 0 or ds_private.is_tensor_parallel(p))
                       and (self.zero_stage == 3 or first_replica))
            self.held.append((p, index[layer_group(single)] if counted else None))
        self.params = [(p, g) for p, g in self.held if g is not None]
        self.before: list[torch.Tensor] | None = None
        self.grad_sq: torch.Tensor | None = None
        self.module = trainer.module
        self.module.before_update.append(self._read_gradients)

    def _weight(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.zero_stage == 3:  # between steps a ZeRO-3 parameter holds no data; its partition does
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        return p.detach()

    def _gradient(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        if self.zero_stage in (1, 2):  # reduced into ZeRO's partitions: gathered whole (a collective)
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(p)
        return p.grad

    def on_step_start(self, trainer: Trainer) -> None:
        step = trainer.step + 1
        if step % trainer.cfg.train.log_every == 0 or step == trainer.cfg.train.steps:
            self.before = [self._weight(p).float().clone() for p, _ in self.params]

    def _read_gradients(self) -> None:
        """Before the update, after the step's backwards (the train module's hook)."""
        if self.before is None:
            return
        engine = self.module.engine
        scale = (ds_private.loss_scale(engine.optimizer) or 1.0) if engine.fp16_enabled() else 1.0
        sq = torch.zeros(len(self.groups), device=self.module.device)
        for p, g in self.held if self.zero_stage in (1, 2) else self.params:
            grad = self._gradient(p)  # ZeRO 1/2: every rank, every parameter, a collective each
            if g is not None and grad is not None:
                sq[g] += grad.float().div(scale).pow(2).sum()
        self.grad_sq = sq

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if "loss" not in metrics or self.before is None:
            return
        n = len(self.groups)
        sums = torch.zeros(3, n, device=trainer.module.device)
        for (p, g), before in zip(self.params, self.before, strict=True):
            after = self._weight(p).float()
            sums[0, g] += (after - before).pow(2).sum()
            sums[1, g] += before.pow(2).sum()
        if self.grad_sq is not None:
            sums[2] = self.grad_sq
        if self.world > 1:
            dist.all_reduce(sums)  # a collective, at the cadence the row is read anyway
        update, weight, grad = sums.sqrt().tolist()
        for i, name in enumerate(self.groups):
            if weight[i] > 0:
                metrics[f"update_ratio/{name}"] = update[i] / weight[i]
            if self.grad_sq is not None:
                metrics[f"grad_norm/{name}"] = grad[i]
        self.before, self.grad_sq = None, None
