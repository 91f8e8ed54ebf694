"""Time and memory of building each rank's part of the model, without the engine: sharded
construction's figures, also for models whose training does not fit the machine.

    torchrun --nproc_per_node=4 -m tools.bench_init CONFIG [--set key=value ...]

Runs what ``seqtrain train`` runs before the engine (setup ► data ► model, ``trainer/build.py``)
and prints one JSON line: per rank the seconds since the process started at each point, the
parameter bytes the rank keeps, and ``init_peak_mb - baseline_mb`` as in ``memory.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from trainer.build import build_data, build_model, setup, whole_model
from trainer.callbacks import memory
from trainer.config import load_config
from trainer.startup import Stopwatch


def kept_mb(model: torch.nn.Module) -> float:
    """Parameter bytes this rank holds (a ZeRO-3 parameter's partition, not its empty shell)."""
    return sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    clock = Stopwatch()
    cfg = load_config(args.config, [*args.overrides, "tracking.enabled=false"])
    cfg, dims, device = setup(cfg)
    clock.lap("setup")
    baseline = memory.current_mb(device)
    memory.reset_peak(device)
    data = build_data(cfg, dims)
    clock.lap("data")
    model = build_model(data.cfg, dims, device)
    clock.lap("model")
    entry = {"rank": dims.rank, "since_start_s": round(clock.total(), 2), "laps_s": clock.laps,
             "kept_mb": round(kept_mb(model), 1), "init_growth_mb": round(memory.peak_mb(device) - baseline, 1)}
    entries = [entry]
    if dist.get_world_size() > 1:
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, entry)
    if dims.rank == 0:
        whole = whole_model(data.cfg, model, dims)
        print(json.dumps({"params": whole.num_params(), "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp,
                                                                   "zero_stage": cfg.parallel.zero_stage},
                          "ranks": entries}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
