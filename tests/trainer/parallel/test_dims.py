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


def test_context_ranks_are_adjacent_inside_deepspeeds_data_axis():
    """data = dp_rank · cp + cp_rank: a replica's cp ranks are neighbours (inside a node, where
    the all-to-alls are cheapest), and the data loader sees dp replicas."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dims = [ParallelDims(2, 1, 1, r, cp=2) for r in range(4)]
    assert [(d.dp_rank, d.cp_rank) for d in dims] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    topo = PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=4)
    assert all(topo.get_coord(d.rank).data == d.dp_rank * 2 + d.cp_rank for d in dims)
