"""Checkpoints: the format and its safe reading (``format``), saving (``save``, with the
asynchronous writer ``async_writer``), resuming and reading weights back (``load``), moving a
checkpoint to another layout (``reshard``) and merging shards into whole weights (``consolidate``).

May import: ``models``, the core (``config``, ``errors``, ``families``, ``distributed``,
``deepspeed_private``) and ``trainer.parallel``. The rest of the trainer goes through the names
below: one room owns the format, so checkpoints load and save in one place.
"""

from trainer.checkpoint.format import (
    MANIFEST,
    atomic_write,
    complete,
    latest,
    manifest,
    resolve,
    safe_load,
    saved_config,
    sha256_file,
    step_of,
    verify,
    without_zip_crc,
    write_manifest,
)
from trainer.checkpoint.load import (
    Restored,
    load,
    load_model,
    load_model_state,
    load_weights,
    read_weights,
    run_tokenizers,
)
from trainer.checkpoint.save import SaveFailed, dir_mb, newest_before, save, set_aside, wait
from trainer.checkpoint.weights import Weights, match_weights

__all__ = [
    "MANIFEST", "Restored", "SaveFailed", "Weights", "atomic_write", "complete", "dir_mb", "latest",
    "load", "load_model", "load_model_state", "load_weights", "manifest", "match_weights", "newest_before",
    "read_weights", "resolve", "run_tokenizers", "safe_load", "save", "saved_config", "set_aside", "sha256_file",
    "step_of", "verify", "wait", "without_zip_crc", "write_manifest",
]
