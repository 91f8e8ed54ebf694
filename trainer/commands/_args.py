"""Arguments several commands share."""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=help or "override a config value (repeatable), e.g. --set train.lr=3e-4")
