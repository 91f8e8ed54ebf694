"""seqtrain's trainer, by rooms (the README's Architecture draws them; ``tests/test_layout.py``
holds their order): the core (``config``, ``families``, ``errors``, ``distributed``), then
``parallel/``, ``accounting/``, ``checkpoint/``, ``data/``, ``engine/``, ``build``, ``loop``,
``evaluation/``, ``callbacks/``, ``train``, and ``commands/`` with the CLI on top."""
