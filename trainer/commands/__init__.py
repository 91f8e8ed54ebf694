"""One module per ``seqtrain`` command: ``register(subparsers)`` adds its parser and
``main(args) -> exit code`` runs it. ``trainer/cli.py`` assembles them."""

from trainer.commands import (
    bench,
    data,
    eval,
    export,
    generate,
    import_hf,
    launch,
    mup,
    plan,
    scaling,
    tracking,
    train,
)

COMMANDS = (train, generate, launch, eval, export, import_hf, bench, plan, scaling, mup, tracking, data)
"""In the order ``seqtrain --help`` lists them."""
