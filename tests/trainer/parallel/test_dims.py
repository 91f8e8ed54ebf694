"""Rank layout: DeepSpeed's pipe × data × model topology, tensor-parallel ranks adjacent."""

from __future__ import annotations

from trainer.parallel import ParallelDims


def test_tensor_ranks_are_adjacent_then_data_then_pipe():
    coords = [(d.pp_rank, d.dp_rank, d.tp_rank) for d in (ParallelDims(2, 2, 2, r) for r in range(8))]
    assert coords == [(p, d, t) for p in range(2) for d in range(2) for t in range(2)]
    assert [ParallelDims(4, 1, 1, r).dp_rank for r in range(4)] == [0, 1, 2, 3]


def test_coordinates_are_deepspeeds():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for dp, tp, pp in [(2, 2, 2), (3, 2, 1), (1, 4, 2), (2, 1, 3)]:
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        for r in range(dp * tp * pp):
            d, c = ParallelDims(dp, tp, pp, r), topo.get_coord(r)
            assert (d.pp_rank, d.dp_rank, d.tp_rank) == (c.pipe, c.data, c.model), (dp, tp, pp, r)
