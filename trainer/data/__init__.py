"""Data path: corpus ► tokenizer ► packed token shards (.bin memmap + meta.json) ► sampler."""

from trainer.data.sampler import BatchSchedule, WindowDataset
from trainer.data.shards import PreparedData, prepare

__all__ = ["BatchSchedule", "PreparedData", "WindowDataset", "prepare"]
