"""Data path: corpus ► tokenizer ► packed token shards (.bin memmap + meta.json) ► sampler, and
``build_data`` that turns them into the loop's batches.

May import: ``models``, the core (``config``, ``errors``, ``distributed``) and
``trainer.parallel``'s dims. Never evaluation, inference or the loop: it feeds them.
"""

from trainer.data.sampler import BatchSchedule, WindowDataset
from trainer.data.shards import PreparedData, prepare

__all__ = ["BatchSchedule", "PreparedData", "WindowDataset", "prepare"]
