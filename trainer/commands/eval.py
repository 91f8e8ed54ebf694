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
    ev.add_argument("--split", default="val", choices=("val", "test"),
                    help="sequence-to-sequence and classifiers: which set of the run's data to score "
                    "(official files where data.val_source / data.test_source name them)")
    ev.add_argument("--text-file", help="language models: a plain text file to evaluate on")
    ev.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (language models)")
    ev.add_argument("--task-dir", help="a folder of lm-eval task YAML files (local tasks, offline)")
    ev.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: each task's own)")
    ev.add_argument("--follow", action="store_true",
                    help="keep evaluating each new checkpoint of the run until it has finished")
    ev.add_argument("--every-seconds", type=float, default=60.0, help="with --follow: how often to look")
    ev.add_argument("--beam", type=int, default=1, help="sequence-to-sequence beam size (1: greedy)")
    ev.add_argument("--limit", type=int, help="sequence-to-sequence pairs to decode (default 500); "
                    "examples to classify, lm-eval documents per task (default all)")
    ev.add_argument("--recognizer", help="speech synthesizers: a speech recognizer's run or checkpoint, "
                    "whose error rates on the synthesised sentences measure their intelligibility")
    ev.add_argument("--max-tokens", type=int, default=200_000, help="language-model tokens to score")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(run=main)


def _evaluation_keywords(args: argparse.Namespace) -> dict:
    """evaluate_checkpoint's keywords; lm-eval's task index is built (and the tasks checked) once."""
    from trainer.errors import SeqtrainError

    if args.tasks is None:
        if args.task_dir or args.num_fewshot is not None:
            raise SeqtrainError("--task-dir and --num-fewshot go with --tasks (lm-eval task names)")
        return dict(data=args.data, text_file=args.text_file, split=args.split, beam=args.beam,
                    limit=args.limit, max_tokens=args.max_tokens, recognizer=args.recognizer)
    from trainer.data import hub

    # Before lm-eval (and datasets) are imported: offline, they read their caches at once.
    hub.offline_unless_reachable()
    from tools.harness import Harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SeqtrainError("--tasks: no task names given")
    return dict(harness=Harness(tasks, args.task_dir, args.num_fewshot, args.limit))


def main(args: argparse.Namespace) -> int:
    from tools.evaluate import evaluate_checkpoint, evaluate_run
    from trainer import checkpoint

    target = Path(args.checkpoint)
    with json_only(args.json):
        kw = _evaluation_keywords(args)
        if args.follow or (target / "checkpoints").is_dir():
            results = evaluate_run(target, follow=args.follow, every_seconds=args.every_seconds, **kw)
        else:
            results = [evaluate_checkpoint(checkpoint.resolve(target), **kw)]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for r in results:
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("samples", "checkpoint", "family", "key", "settings", "attention_pngs",
                                       "audio_files"))
        print(f"{r['checkpoint']}: {shown}")
        if r.get("attention_pngs"):
            print(f"  attention maps: {Path(r['attention_pngs'][0]).parent}/ ({len(r['attention_pngs'])} PNGs)")
        if r.get("audio_files"):
            print(f"  sounds: {Path(r['audio_files'][0]).parent}/ ({len(r['audio_files'])} WAVs)")
    for s in results[-1]["samples"]:
        print(f"  sample: {s!r}")
    if len(results) > 1:
        print(f"curve: {target / 'eval' / 'curve.png'}; results: {target / 'eval' / 'results.jsonl'}")
    return 0
