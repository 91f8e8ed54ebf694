"""Checkpoints: DeepSpeed's shards written atomically, a ``latest`` pointer, retention, loading.

Layout of ``<run_dir>/checkpoints/``::

    step_00000500/            one complete checkpoint (DeepSpeed files + config.yaml)
    latest                    text file naming the newest complete checkpoint
    .tmp/                     where a checkpoint is written before it is renamed into place

A checkpoint directory is only ever renamed into place once every rank has written its files,
and ``latest`` is replaced atomically after that, so a crash at any moment leaves the previous
checkpoint valid and pointed to.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import distributed
from trainer.errors import CheckpointError

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_state_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_state_{rank:05d}.pt"


def save(engine, ckpt_root: Path, step: int, client_state: dict[str, Any], config_yaml: str,
         keep_last: int | None = None, rank_state: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    ``client_state`` is the same on every rank (DeepSpeed stores rank 0's); ``rank_state``
    differs per rank (e.g. carried RNN states) and goes to a file per rank.
    """
    tag = tag_for(step)
    staging = ckpt_root / ".tmp"
    if distributed.rank() == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, rank_state_file(staging / tag, distributed.rank()))
    # Every rank's shard must be on disk before rank 0 publishes the directory.
    distributed.barrier()
    final = ckpt_root / tag
    if distributed.rank() == 0:
        (staging / tag / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        _atomic_write(ckpt_root / LATEST, tag + "\n")
        if keep_last:
            _prune(ckpt_root, keep_last, protect=tag)
    distributed.barrier()
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    tags = sorted(p.name for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old != protect:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root``, or None."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        d = ckpt_root / pointer.read_text().strip()
        if d.is_dir():
            return d
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, a checkpoints folder or a checkpoint itself."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "config.yaml").is_file() and any(candidate.glob("mp_rank_*_model_states.pt")):
            return candidate
        found = latest(candidate)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: not a checkpoint, a checkpoints folder or a run directory with checkpoints"
    )


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, whatever its ZeRO stage (consolidated on the CPU)."""
    import yaml

    stage = yaml.safe_load((ckpt / "config.yaml").read_text())["parallel"]["zero_stage"]
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model states file (an incomplete checkpoint)")
    try:
        if stage >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # Master weights live in the (sharded) optimizer state: consolidate them.
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    except Exception as e:  # torch/pickle/zip errors of a truncated or corrupted file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({msg})") from None
    return {k: v.float() for k, v in state.items()}
