"""``seqtrain import-hf DIR --out OUT``: start a GPT run from a local GPT-2 or Llama folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    im = sub.add_parser("import-hf", help="start a GPT run from a local GPT-2 or Llama transformers folder")
    im.add_argument("hf_dir", type=Path)
    im.add_argument("--out", required=True, type=Path)
    im.add_argument("--name")
    im.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from tools.import_hf import import_hf

    cfg_path = import_hf(args.hf_dir, args.out, args.name)
    print(f"wrote {args.out}; fine-tune with: seqtrain train {cfg_path} --set data.source=...")
    return 0
