"""``seqtrain plan CONFIG --gpus N``: memory per GPU and step time of every layout, ranked."""

from __future__ import annotations

import argparse

from trainer.commands._args import add_overrides


def register(sub) -> None:
    pl = sub.add_parser("plan", help="memory per GPU and step time of every parallel layout, ranked")
    pl.add_argument("config")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--gpu", help="GPU kind (H200, H100, A100, A10G, L40S, V100); default H100")
    pl.add_argument("--gpu-memory-gb", type=float, help="memory per GPU, GiB (default: the kind's)")
    pl.add_argument("--efficiency", type=float, default=0.5,
                    help="share of the dense peak the matmuls reach (default 0.5)")
    pl.add_argument("--top", type=int, default=10, help="layouts in the table")
    pl.add_argument("--json", action="store_true", help="print only JSON: params and every layout")
    add_overrides(pl)
    pl.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    import json

    from trainer.accounting.planner import plan, table
    from trainer.config import load_config
    from trainer.errors import ConfigError

    if not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency {args.efficiency}: a share of the peak, in (0, 1]")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory-gb {args.gpu_memory_gb}: must be positive")
    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.gpus, args.nodes, args.gpu, args.gpu_memory_gb, args.efficiency)
    if args.json:
        print(json.dumps({"params": result["params"], "layouts": result["layouts"]}))
    else:
        print(table(result, args.top))
    return 0
