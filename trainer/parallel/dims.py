"""The data/tensor/pipeline degrees of a run, this process's coordinates and its process groups.

Ranks are laid out by DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model):
rank = pipe · (dp · tp) + data · tp + model, so the tensor-parallel ranks of one replica are
adjacent and stay inside a node, where their per-layer all-reduces are cheapest.

Context parallelism (``cp`` ranks share each sequence) lives inside DeepSpeed's data axis:
data = dp_rank · cp + cp_rank. DeepSpeed then averages gradients and partitions ZeRO states
over dp · cp ranks (as DeepSpeed-Ulysses does), while the data loader, which reads ``dp`` and
``dp_rank``, gives the cp ranks of one replica the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """dp × tp × pp × cp = world size, and this rank's place in it."""

    dp: int
    tp: int
    pp: int
    rank: int
    cp: int = 1

    def __post_init__(self) -> None:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @cached_property
    def topology(self):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp * self.cp)

    # Coordinates by the layout's formula rather than from ``topology``: a run of one process
    # never imports DeepSpeed (seconds at start); tests check the two agree.
    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp) % self.dp

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp % self.cp

    @cached_property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The ranks sharing this rank's sequences (``None`` without context parallelism).

        Creating it is a collective (every rank creates every group, in the same order): call
        it on all ranks at the same point, as ``build.setup`` does."""
        if self.cp == 1:
            return None
        mine = None
        for first in range(0, self.world_size, self.tp * self.cp):
            for t in range(self.tp):
                ranks = list(range(first + t, first + self.tp * self.cp, self.tp))
                group = dist.new_group(ranks)
                mine = group if self.rank in ranks else mine
        return mine

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp * self.cp)

    def coordinates(self, rank: int) -> tuple[int, int, int, int]:
        """(pp, dp, cp, tp) coordinates of any ``rank`` of this layout."""
        other = ParallelDims(self.dp, self.tp, self.pp, rank, self.cp)
        return other.pp_rank, other.dp_rank, other.cp_rank, other.tp_rank

    @cached_property
    def grid(self):
        """DeepSpeed's ``PipelineParallelGrid`` over our topology: the process groups.

        Built on first use, which is a collective (every rank creates every group, in the same
        order), so call it on all ranks at the same point: ``train`` does, before the model.
        """
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        return PipelineParallelGrid(topology=self.topology)

    @property
    def mpu(self):
        """The model-parallel unit for ``deepspeed.initialize``: the grid when tensor parallel
        without pipeline; ``None`` otherwise (the pipeline engine builds its own from the
        topology, and a pure data-parallel run needs none)."""
        return self.grid if self.tp > 1 and self.pp == 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """DeepSpeed's data-parallel group, dp · cp ranks (``None``, the world, when there is no
        model parallelism)."""
        return None if self.tp * self.pp == 1 else self.grid.get_data_parallel_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.grid.get_slice_parallel_group()

    @property
    def model_group(self) -> dist.ProcessGroup | None:
        """All ranks of one model replica (pipe × tensor): where a gradient norm is summed."""
        return None if self.tp * self.pp == 1 else self.grid.get_model_parallel_group()

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a tensor over data-parallel replicas (a collective: every rank must call it).

        Over the cp ranks of a replica too: each holds its share of a context-parallel loss
        (``trainer/parallel/context.py`` scales it so), or the same value (evaluation)."""
        n = self.dp * self.cp
        if n == 1 or not dist.is_initialized():
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t / n
