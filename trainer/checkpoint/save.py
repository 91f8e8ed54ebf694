"""Saving a checkpoint: a collective that stages every rank's files, agrees on success and
publishes the directory atomically (``format.py`` says what is where); with an ``AsyncSaver``
the files are written behind training and ``wait`` reports the outcome."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.checkpoint.format import (
    LATEST,
    atomic_write,
    complete,
    latest,
    rank_state_file,
    step_of,
    tag_for,
    without_zip_crc,
    write_manifest,
)
from trainer.errors import CheckpointError


class SaveFailed(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost mount): the staging directory is
    gone, ``latest`` still names the last good checkpoint. The CLI exits with this code."""

    exit_code = 4


def save(module, ckpt_root: Path, step: int, client_state: dict[str, Any], config_yaml: str,
         keep_last: int | None = None, rank_state: dict[str, Any] | None = None,
         manifest_extra: dict[str, Any] | None = None, saver=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory, or raises
    ``SaveFailed`` on every rank when any rank could not write its part.

    ``client_state`` is the same on every rank (DeepSpeed stores rank 0's); ``rank_state``
    differs per rank (e.g. carried RNN states) and goes to a file per rank. With ``saver`` (an
    ``AsyncSaver``) the state is only snapshotted here; it is written and published behind
    training, and ``wait`` reports the outcome.
    """
    tag = tag_for(step)
    staging = ckpt_root / ".tmp"
    if distributed.rank() == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    writes: list = []

    @without_zip_crc()
    def shards() -> None:
        if saver is None:
            module.save_checkpoint(staging, tag, client_state)
            if rank_state is not None:
                torch.save(rank_state, rank_state_file(staging / tag, distributed.rank()))
            return
        with saver.capture(module.engine) as captured:
            module.save_checkpoint(staging, tag, client_state)
        writes.extend(captured)
        if rank_state is not None:
            writes.append((saver.snapshot(rank_state), rank_state_file(staging / tag, distributed.rank())))

    # Every rank's shard must be on disk before rank 0 publishes the directory: agreeing on
    # success is the barrier.
    _agree(_attempt(shards), ckpt_root, tag)
    final = ckpt_root / tag

    def publish() -> None:
        (staging / tag / "config.yaml").write_text(config_yaml)
        write_manifest(staging / tag, step, manifest_extra or {})
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        atomic_write(ckpt_root / LATEST, tag + "\n")
        if keep_last:
            _prune(ckpt_root, keep_last, protect=tag)

    if saver is not None:
        saver.submit(writes, publish, ckpt_root, tag)
        return final
    _agree(_attempt(publish) if distributed.rank() == 0 else None, ckpt_root, tag)
    return final


def wait(saver) -> tuple[Path, float] | None:
    """Collective: wait for ``saver``'s save in flight; (its directory, seconds its writing
    took), None when none was in flight, or ``SaveFailed`` on every rank when any rank failed."""
    outcome = saver.wait()
    if outcome is None:
        return None
    error, seconds, pending = outcome
    _agree(error, pending.ckpt_root, pending.tag)
    return pending.ckpt_root / pending.tag, seconds


def _attempt(fn) -> Exception | None:
    try:
        fn()
    except Exception as e:  # OSError, or torch's RuntimeError "file write failed" on ENOSPC
        return e
    return None


def dir_mb(d: Path) -> float:
    """Size of a directory's files, in MiB (0 if it does not exist)."""
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20 if d.is_dir() else 0.0


def _agree(error: Exception | None, ckpt_root: Path, tag: str) -> None:
    """Collective: if any rank failed, remove the staging directory and raise ``SaveFailed``
    on every rank, naming where, about how much a checkpoint needs and how much is free."""
    if not distributed.any_rank(error is not None):
        return
    staged = ckpt_root / ".tmp" / tag
    previous = latest(ckpt_root)
    need = max(dir_mb(previous) if previous else 0.0, dir_mb(staged))
    distributed.barrier()  # every rank has stopped writing before the directory goes
    if distributed.rank() == 0:
        shutil.rmtree(staged, ignore_errors=True)
    distributed.barrier()
    free = shutil.disk_usage(ckpt_root).free / 2**20
    why = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else "on another rank"
    raise SaveFailed(
        f"could not save {tag} in {ckpt_root} ({why}): a checkpoint needs about {need:.1f} MB, "
        f"{free:.1f} MB are free there; latest stays {previous.name if previous else 'none'}"
    )


def newest_before(ckpt_root: Path, step: int) -> Path | None:
    """The newest complete checkpoint saved before ``step``, if any."""
    older = [p for p in complete(ckpt_root) if step_of(p) < step]
    return older[-1] if older else None


def set_aside(ckpt_root: Path, before_step: int) -> Path | None:
    """Collective: make the newest checkpoint from before ``before_step`` the one a resume
    takes. Newer ones move to ``ckpt_root/set_aside/`` (kept, not deleted: they hold the weights
    a rewind discarded) and ``latest`` points back. Returns that checkpoint, or None (on every
    rank) when there is none."""
    target = newest_before(ckpt_root, before_step)
    if target is not None and distributed.rank() == 0:
        aside = ckpt_root / "set_aside"
        aside.mkdir(exist_ok=True)
        for p in complete(ckpt_root):
            if step_of(p) >= before_step:
                shutil.rmtree(aside / p.name, ignore_errors=True)
                os.replace(p, aside / p.name)
        atomic_write(ckpt_root / LATEST, target.name + "\n")
    distributed.barrier()
    return target


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never ``protect`` (the one just
    written and pointed to by ``latest``)."""
    tags = sorted(p.name for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old != protect:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)


