"""``seqtrain data prepare CONFIG``: tokenize a config's corpus into packed shards ahead of time."""

from __future__ import annotations

import argparse

from trainer.commands._args import add_overrides


def register(sub) -> None:
    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize the corpus of a config into packed shards")
    dp.add_argument("config")
    dp.add_argument("--workers", type=int, default=1, metavar="N",
                    help="processes encoding shards side by side (default 1: tokenizers' own threads)")
    dp.add_argument("--part", metavar="I/N",
                    help="prepare only shards i, i+n, i+2n, ... (one node of n, or one Slurm array task); "
                         "the part that completes the set writes the dataset")
    add_overrides(dp)
    dp.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.data import prepare
    from trainer.data.mixture import prepare_mixture
    from trainer.data.shards import parse_part
    from trainer.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give at least 1")
    part = parse_part(args.part) if args.part else None
    kw = {"workers": args.workers, "part": part}
    prepared = prepare_mixture(cfg.data, **kw) if cfg.data.mixture else [(None, prepare(cfg.data, **kw))]
    for m, prep in prepared:
        label = f"{m.label} (weight {m.weight:g}): " if m else ""
        if prep is None:  # prepare said which shards other parts still owe
            continue
        splits = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in prep.meta["splits"].items())
        print(f"{label}{prep.dir}: {splits}")
    return 0
