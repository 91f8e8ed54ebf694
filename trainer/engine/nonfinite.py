"""Skip optimizer updates whose gradients are not finite, and stop a run that keeps diverging.

A NaN or inf gradient on any rank would poison the weights everywhere after the next update.
The guard wraps the step of the torch optimizer itself (the innermost one, which every DeepSpeed
path calls at the accumulation boundary: plain, ZeRO 1/2/3, pipeline, bf16): it checks this
rank's gradients, agrees with every other rank through one all-reduce (MAX), and skips the
update on all of them together. The step is still counted (the data and the LR schedule move
on) and logged as skipped. Where DeepSpeed checks for overflow itself (ZeRO 1/2, the fp16 loss
scaler, its bf16/fp16 wrappers) it skips first and the guard never sees the step; the train
module tells it so (``end_step``), and the loop counts both.

No host sync: the verdict stays on the device. Fused AdamW (the default on CUDA and CPU) takes
it as ``found_inf`` and skips inside its kernel, weight decay and step count included, as under
torch's own ``GradScaler``. The counts (skipped updates, the current run of them) are device
tensors too, read at the logging cadence. Only an optimizer without ``found_inf`` (foreach or
single-tensor Adam) reads the verdict on the host at each step.
Cost: one scalar all-reduce per optimizer step (``train.nonfinite_patience: 0`` turns it off).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._skipped: torch.Tensor | int = 0
        """Updates this guard skipped since this process started (a device tensor once stepped)."""
        self._run: torch.Tensor | int = 0
        """Skipped updates in a row up to the last step, by the guard or the engine."""
        self._step_bad: torch.Tensor | None = None
        """This step's verdict (ZeRO-3 steps the optimizer once per sub-group: the worst)."""
        inner = optimizer.step
        on_device = bool(optimizer.defaults.get("fused"))  # fused Adam(W) takes found_inf

        def step(opt, *args, **kwargs):
            bad = self._verdict(optimizer)
            self._step_bad = bad if self._step_bad is None else torch.maximum(self._step_bad, bad)
            if on_device:
                optimizer.found_inf = bad  # the kernel skips the update, and undoes the step count
                return inner(*args, **kwargs)
            if bad.item():  # host sync, per step: only optimizers without found_inf
                return None
            return inner(*args, **kwargs)

        # A bound method, as torch's LR scheduler (which wraps ``step`` in turn) expects.
        optimizer.step = types.MethodType(step, optimizer)

    @staticmethod
    def _verdict(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """1.0 where any rank holds a non-finite gradient, else 0.0 (fp32 scalar, on the device)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank skips together: ZeRO ranks own different parameter partitions and
            # pipeline stages different layers, but one model.
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad

    def end_step(self, engine_skipped: bool) -> None:
        """After each optimizer step: count it (device arithmetic, no sync). Where the engine
        skipped the update before the guard saw it, that counts in the run too
        (``engine_skipped``, host knowledge: a skip that is not the fp16 loss scaler's work)."""
        bad, self._step_bad = self._step_bad, None
        if bad is not None:
            self._skipped = self._skipped + bad
            self._run = (self._run + 1) * bad
        elif engine_skipped:
            self._run = self._run + 1

    @property
    def skipped(self) -> int:
        """Updates the guard skipped in this process (a host read: at the logging cadence)."""
        return int(self._skipped)

    def run(self) -> int:
        """Updates skipped in a row up to the last step (a host read: at the logging cadence)."""
        return int(self._run)
