"""``seqtrain mup coord-check CONFIG --widths 64,128,256,512 --steps 5``: μP's coordinate check."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.commands._args import add_overrides, json_only
from trainer.errors import ConfigError


def register(sub) -> None:
    mp = sub.add_parser("mup", help="μP tools: the coordinate check")
    msub = mp.add_subparsers(dest="mup_command", required=True)
    cc = msub.add_parser("coord-check", help="activation sizes against width, SP beside μP, over a few Adam steps")
    cc.add_argument("config", help="a gpt or encdec config, e.g. configs/gpt/mup-debug.yaml")
    cc.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values, increasing")
    cc.add_argument("--steps", type=int, default=5, help="Adam steps (sizes are recorded before each and after the last)")
    cc.add_argument("--base-width", type=int, help="μP base width (default: the config's model.mup.base_width, "
                                                   "else the narrowest width)")
    cc.add_argument("--seeds", type=int, default=3, help="initialisation seeds each size is averaged over")
    cc.add_argument("--lr", type=float, help="learning rate (default: the config's train.lr)")
    cc.add_argument("--table-step", type=int, default=3, help="the step the table and its slopes show")
    cc.add_argument("--out", type=Path, default=Path("runs/coord-check"),
                    help="directory for coord_check.json, .txt and .png")
    cc.add_argument("--json", action="store_true", help="print the result as JSON")
    add_overrides(cc)
    sw = msub.add_parser("lr-sweep", help="validation loss per (width, learning rate), SP beside μP")
    sw.add_argument("config", help="a gpt-family config, e.g. configs/gpt/mup-debug.yaml")
    sw.add_argument("--widths", default="64,128,256", help="comma-separated d_model values")
    sw.add_argument("--lrs", required=True, help="comma-separated learning rates (at least 5 for a curve)")
    sw.add_argument("--steps", type=int, required=True, help="optimizer steps of every run")
    sw.add_argument("--base-width", type=int, help="μP base width (default: the config's, else the narrowest)")
    sw.add_argument("--out", type=Path, required=True, help="directory for the runs, sweep.json, .md and .png")
    add_overrides(sw)
    mp.set_defaults(run=main)


def _numbers(text: str, flag: str, kind=int) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: comma-separated numbers, e.g. 64,128,256,512") from None


def main(args: argparse.Namespace) -> int:
    return {"coord-check": _coord_check, "lr-sweep": _lr_sweep}[args.mup_command](args)


def _lr_sweep(args: argparse.Namespace) -> int:
    from tools.scaling.lr_sweep import plot, sweep, table

    widths, lrs = _numbers(args.widths, "--widths"), _numbers(args.lrs, "--lrs", float)
    if args.steps < 1 or any(lr <= 0 for lr in lrs):
        raise ConfigError(f"--steps {args.steps} --lrs {args.lrs}: a positive step count and positive rates")
    result = sweep(args.config, widths, lrs, args.steps, args.out, args.overrides, args.base_width)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
    (args.out / "sweep.md").write_text(table(result) + "\n")
    plot(result, args.out / "sweep.png")
    print(table(result))
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


def _coord_check(args: argparse.Namespace) -> int:
    from tools.scaling.coord_check import coord_check, table, write

    widths = _numbers(args.widths, "--widths")
    if not 0 <= args.table_step <= args.steps:
        raise ConfigError(f"--table-step {args.table_step}: between 0 and --steps {args.steps}")
    with json_only(args.json):
        cc = coord_check(args.config, widths, args.steps, args.overrides, args.base_width, args.lr, args.seeds)
        result = write(cc, args.out, args.table_step)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(cc, args.table_step))
        print(f"wrote {args.out}/coord_check.json, coord_check.txt, coord_check.png")
    return 0
