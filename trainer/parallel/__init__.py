"""Parallel layout: degrees, ranks and groups. Applied to single-device models from outside."""

from trainer.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
