"""Communication accounting: what the counter records for each kind of transfer (2 forked
gloo processes), against the tensors' own sizes."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from tests.trainer.parallel.test_tensor import _spawn
from trainer.accounting.comm import CommCounter
from trainer.accounting.comm_volume import StepShape, volumes, wire
from trainer.parallel import ParallelDims
from trainer.parallel.sequence import gather_sequence  # imported before the counter installs

pytestmark = pytest.mark.distributed


def _counts(rank: int, world: int) -> None:
    counter = CommCounter(ParallelDims(1, 2, 1, rank)).install()  # tp2: the world is the tensor group
    try:
        x = torch.ones(6)  # 24 bytes
        dist.all_reduce(tensor=x)  # by keyword, as DeepSpeed calls it
        dist.all_gather_into_tensor(torch.empty(12), x)  # deprecated: forwards to all_gather_single
        gather_sequence(torch.ones(1, 2, 3), dist.group.WORLD)  # (1, 4, 3) fp32 gathered: 48 bytes
        dist.reduce_scatter_single(torch.empty(3), x)
        dist.all_to_all_single(torch.empty(6), x)
        if rank == 0:
            dist.send(x, 1)
        else:
            dist.recv(x, 0)
        other = dist.new_group(backend="gloo")
        side = threading.Thread(target=lambda: dist.all_reduce(torch.ones(1), group=other))
        side.start()  # another thread's collectives are not the step's
        side.join()
        got = counter.take()
    finally:
        counter.uninstall()
    p2p = {"tp.send": {"calls": 1, "bytes": 24}} if rank == 0 else {"tp.recv": {"calls": 1, "bytes": 24}}
    assert got == {"tp.all_reduce": {"calls": 1, "bytes": 24}, "tp.all_gather": {"calls": 2, "bytes": 96},
                   "tp.reduce_scatter": {"calls": 1, "bytes": 24}, "tp.all_to_all": {"calls": 1, "bytes": 24},
                   **p2p}
    assert counter.take() == {}  # take resets


def test_the_counter_records_kind_group_and_payload():
    _spawn(_counts)


def test_ring_wire_bytes_follow_the_zero_paper():
    """ZeRO 0-2 put 2Ψ(n-1)/n on the wire per step, ZeRO-3 3Ψ(n-1)/n (Rajbhandari et al. 2020)."""
    base = dict(n_layer=2, d_model=8, seq_len=4, micro_batch=1, grad_accum=1, vocab=16, bytes_per_value=2,
                held_params=1000, dp=4)
    for stage, factor in ((0, 2), (1, 2), (2, 2), (3, 3)):
        x = StepShape(**base, zero_stage=stage)
        assert wire(x, volumes(x)) == {"dp": pytest.approx(factor * 2000 * 3 / 4)}
