"""The activation-memory benchmark measures what sequence parallelism saves."""

from __future__ import annotations

import re

import pytest

from tools import bench_activations

pytestmark = pytest.mark.distributed


def test_sequence_parallel_keeps_less_per_rank(capsys):
    bench_activations.main(["--seq", "128"])
    rows = dict(re.findall(r"^\| (.+?) \| ([\d.]+) \|", capsys.readouterr().out, re.M))
    one, tp, sp = float(rows["one process"]), float(rows["tp2"]), float(rows["tp2 + sp"])
    # tp halves attention and the MLP's inner activations but replicates the rest; sp cuts the
    # rest too, so it keeps less than tp, and more than half of one process (nothing is cut
    # below 1/tp).
    assert one / 2 < sp < tp < one
