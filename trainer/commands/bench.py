"""``seqtrain bench CONFIG``: tokens/s, time per phase, MFU and memory against a plain PyTorch loop."""

from __future__ import annotations

import argparse

from trainer.commands._args import add_overrides, json_only


def register(sub) -> None:
    be = sub.add_parser("bench", help="tokens/s, time per phase, MFU and memory against a plain PyTorch loop")
    be.add_argument("config")
    be.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--features", action="store_true", help="also each speed feature on/off")
    be.add_argument("--repeat", type=int, default=3,
                    help="runs per variant (interleaved; best and median reported)")
    be.add_argument("--plain-set", dest="plain_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra options for the plain loop only, e.g. train.compile=true (its best options)")
    be.add_argument("--json", action="store_true")
    be.add_argument("--nproc", type=int, default=1,
                    help="processes per variant (torchrun); communication is timed")
    add_overrides(be, help="override a config value (repeatable)")
    be.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    import json

    from tools.bench import bench, table
    from trainer.config import load_config

    load_config(args.config, [*args.overrides, *args.plain_overrides])  # one-line errors here, not in a worker
    with json_only(args.json):
        results = bench(args.config, args.overrides, args.steps, args.warmup, args.features, args.repeat,
                        args.nproc, args.plain_overrides)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0
