"""``seqtrain eval CKPT_OR_RUN``: metrics of a checkpoint, or a curve over every checkpoint of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.commands._args import json_only


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint, or every checkpoint of a run directory")
    ev.add_argument("checkpoint", help="run directory (every checkpoint: a curve) or one checkpoint")
    ev.add_argument("--data", help="a config whose data section to evaluate on (its validation split), "
                    "or for sequence-to-sequence a .tsv/.jsonl of pairs")
    ev.add_argument("--text-file", help="language models: a plain text file to evaluate on")
    ev.add_argument("--beam", type=int, default=1, help="sequence-to-sequence beam size (1: greedy)")
    ev.add_argument("--limit", type=int, default=500, help="sequence-to-sequence pairs to decode")
    ev.add_argument("--max-tokens", type=int, default=200_000, help="language-model tokens to score")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    from tools.evaluate import evaluate_checkpoint, evaluate_run
    from trainer import checkpoint

    kw = dict(data=args.data, text_file=args.text_file, beam=args.beam, limit=args.limit,
              max_tokens=args.max_tokens)
    target = Path(args.checkpoint)
    with json_only(args.json):
        if (target / "checkpoints").is_dir():
            results = evaluate_run(target, **kw)
        else:
            results = [evaluate_checkpoint(checkpoint.resolve(target), **kw)]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for r in results:
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("samples", "checkpoint", "family"))
        print(f"{r['checkpoint']}: {shown}")
    for s in results[-1]["samples"]:
        print(f"  sample: {s!r}")
    if len(results) > 1:
        print(f"curve: {target / 'eval' / 'curve.png'}; results: {target / 'eval' / 'results.jsonl'}")
    return 0
