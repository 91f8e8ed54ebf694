"""Skip optimizer updates whose gradients are not finite, and stop a run that keeps diverging.

A NaN or inf gradient on any rank would poison the weights everywhere after the next update.
The guard wraps the step of the torch optimizer itself (the innermost one, which every DeepSpeed
path calls at the accumulation boundary: plain, ZeRO 1/2/3, pipeline, bf16): it checks this
rank's gradients, agrees with every other rank through one all-reduce, and skips the update on
all of them together. The step is still counted (the data and the LR schedule move on) and
logged as skipped. Where DeepSpeed checks for overflow itself (ZeRO 1/2, the fp16 loss scaler)
it skips first and the guard never sees the step; the loop counts both.

Cost: one scalar all-reduce and one host read per optimizer step (``train.nonfinite_patience: 0``
turns the guard off).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.skipped = 0
        """Updates skipped so far in this process (since the run or its resume started)."""
        inner = optimizer.step

        def step(opt, *args, **kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            dev = grads[0].device if grads else torch.device("cpu")
            finite = torch.ones((), device=dev)
            if grads:
                finite = torch.isfinite(torch.nn.utils.get_total_norm(grads)).float()
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Every rank skips together: ZeRO ranks own different parameter partitions and
                # pipeline stages different layers, but one model.
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:  # host sync, once per optimizer step
                self.skipped += 1
                return None
            return inner(*args, **kwargs)

        # A bound method, as torch's LR scheduler (which wraps ``step`` in turn) expects.
        optimizer.step = types.MethodType(step, optimizer)
