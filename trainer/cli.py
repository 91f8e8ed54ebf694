"""The ``seqtrain`` command line. Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import SeqtrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqtrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML preset")
    t.add_argument("config", help="YAML preset, e.g. configs/gpt/debug.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=3e-4")
    t.add_argument("--run-dir", type=Path, help="run directory (default runs/<name>)")

    g = sub.add_parser("generate", help="sample from a language model or translate with a "
                       "sequence-to-sequence model (checkpoint or run directory)")
    g.add_argument("checkpoint", help="run directory, checkpoints folder or checkpoint")
    g.add_argument("--prompt", default="", help="language models: text to continue")
    g.add_argument("--source", action="append", default=[],
                   help="sequence-to-sequence: a source sentence (repeatable)")
    g.add_argument("--input", type=Path, help="sequence-to-sequence: a file of source lines")
    g.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize the corpus of a config into packed shards")
    dp.add_argument("config")
    dp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from trainer.config import load_config

    if args.command == "train":
        cfg = load_config(args.config, args.overrides)
        from trainer.train import train

        train(cfg, args.run_dir or Path("runs") / cfg.name)
    elif args.command == "generate" and (args.source or args.input):
        from trainer.generate import translate

        sources = list(args.source)
        if args.input:
            if not args.input.is_file():
                raise SeqtrainError(f"--input {args.input}: no such file")
            sources += [line for line in args.input.read_text().splitlines() if line.strip()]
        for src, out in zip(sources, translate(args.checkpoint, sources, args.beam, args.length_penalty), strict=True):
            print(f"{src}\t{out}")
    elif args.command == "generate":
        from trainer.generate import generate_text

        samples = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, args.num_samples)
        for i, s in enumerate(samples):
            print(f"----- sample {i} -----\n{s}")
    elif args.command == "data":
        cfg = load_config(args.config, args.overrides)
        from trainer.data import prepare

        prep = prepare(cfg.data)
        print(f"{prep.dir}: " + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in prep.meta["splits"].items()))
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SeqtrainError as e:
        print(f"seqtrain: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
