"""Parallel layout, applied to single-device models from outside: degrees, ranks and groups
(``dims``), tensor, sequence and context parallelism, pipeline stages, activation
checkpointing and sharded (meta-device) construction.

May import: ``models``, the core (``config``, ``errors``, ``families``, ``deepspeed_private``,
``host_memory``). Not checkpoints, engines or the loop.
"""

from trainer.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
