"""The ``seqtrain`` command line: each command lives in ``trainer/commands/`` (its parser and
its ``main``). Errors in user input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys

from trainer.commands import COMMANDS
from trainer.errors import SeqtrainError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqtrain", description="Train, evaluate and export sequence "
                                "models (GPT, encoder-decoder, RNN); scaling-law experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except SeqtrainError as e:
        print(f"seqtrain: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
