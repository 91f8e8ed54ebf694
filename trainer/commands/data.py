"""``seqtrain data prepare CONFIG``: tokenize a config's corpus into packed shards ahead of time."""

from __future__ import annotations

import argparse

from trainer.commands._args import add_overrides


def register(sub) -> None:
    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize the corpus of a config into packed shards")
    dp.add_argument("config")
    add_overrides(dp)
    dp.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.data import prepare
    from trainer.data.mixture import prepare_mixture

    cfg = load_config(args.config, args.overrides)
    prepared = prepare_mixture(cfg.data) if cfg.data.mixture else [(None, prepare(cfg.data))]
    for m, prep in prepared:
        splits = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in prep.meta["splits"].items())
        print(f"{f'{m.label} (weight {m.weight:g}): ' if m else ''}{prep.dir}: {splits}")
    return 0
