"""Arguments several commands share."""

from __future__ import annotations

import argparse
import contextlib
import sys


def add_overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=help or "override a config value (repeatable), e.g. --set train.lr=3e-4")


@contextlib.contextmanager
def json_only(enabled: bool):
    """With ``--json``: whatever the work prints (our summaries, libraries' progress lines)
    goes to stderr, so that stdout carries the JSON alone (``| jq``, ``json.load``)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield
