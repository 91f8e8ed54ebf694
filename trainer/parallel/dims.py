"""The data/tensor/pipeline degrees of a run and this process's coordinates in them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """dp × tp × pp = world size; today tp = pp = 1, so every rank is its own dp replica."""

    dp: int
    tp: int
    pp: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp) if self.tp * self.pp > 1 else self.rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """``None`` is the world group, which is the data-parallel group while tp = pp = 1."""
        return None

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a tensor over data-parallel replicas (a collective: every rank must call it)."""
        if self.dp == 1 or not dist.is_initialized():
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t / self.dp
