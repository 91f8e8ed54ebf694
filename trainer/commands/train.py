"""``seqtrain train CONFIG``: train a model from a YAML preset (resumes its run directory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.commands._args import add_overrides


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML preset")
    p.add_argument("config", help="YAML preset, e.g. configs/gpt/debug.yaml")
    add_overrides(p)
    p.add_argument("--run-dir", type=Path, help="run directory (default runs/<name>)")
    p.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from trainer.startup import Stopwatch

    clock = Stopwatch()
    from trainer import distributed
    from trainer.config import load_config
    from trainer.train import train

    clock.lap("imports")
    cfg = load_config(args.config, args.overrides)
    clock.lap("config")
    trainer = train(cfg, args.run_dir or Path("runs") / cfg.name, clock)
    code = 3 if trainer.diverged else 0  # a failed job for the scheduler, unlike a clean stop
    return distributed.leave(code)
