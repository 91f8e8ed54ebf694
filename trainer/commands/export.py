"""``seqtrain export CKPT --out DIR``: a transformers GPT-2 or Llama folder, or plain safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    ex = sub.add_parser("export", help="export a checkpoint (any layout) for other tools")
    ex.add_argument("checkpoint")
    ex.add_argument("--format", choices=["hf", "safetensors"], default="hf",
                    help="hf: a transformers folder (GPT-2 or Llama, by the model's shape); safetensors: full fp32 weights of any family")
    ex.add_argument("--out", required=True, type=Path)
    ex.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from tools.export_hf import export_hf, export_safetensors

    if args.format == "safetensors":
        print(f"wrote {export_safetensors(args.checkpoint, args.out)}")
        return 0
    check = export_hf(args.checkpoint, args.out)
    print(f"wrote {args.out} (transformers {check['class']}); reloaded logits differ by at most "
          f"{check['max_abs_logit_diff']:.2e}")
    return 0
