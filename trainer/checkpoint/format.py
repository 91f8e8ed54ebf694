"""The checkpoint format, and the one place that reads it safely: names, manifests and their
checks, the ``latest`` pointer, what a resumed run must share with its checkpoint, and
``torch.load`` with an allow-list (no pickle we open may run code).

Layout of ``<run_dir>/checkpoints/``::

    step_00000500/            one complete checkpoint (DeepSpeed files + config.yaml
                              + manifest.json: every file's size and sha256)
    latest                    text file naming the newest complete checkpoint
    .tmp/                     where a checkpoint is written before it is renamed into place

Inside a checkpoint, the train module's engine writes its own files (DeepSpeed: model states,
optimizer shards, and the loop's ``client_state``: step, tokens, skipped updates, RNG states);
``rank_state_{rank}.pt`` holds what differs per rank (carried recurrent states).

A checkpoint directory is only ever renamed into place once every rank has written its files,
and ``latest`` is replaced atomically after that, so a crash at any moment leaves the previous
checkpoint valid and pointed to. A checkpoint damaged later (a truncated or altered file) is
caught by its manifest when a run resumes, which then falls back to the newest intact one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer.config import Config
from trainer.errors import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 2
"""Written into every manifest. 2: fused, head-major attention projections (``models/fused_qkv.py``);
1 (no ``format`` key): separate q, k and v tensors."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[-1])


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_state_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_state_{rank:05d}.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path, step: int, extra: dict[str, Any]) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "step": step,
        "format": FORMAT,
        **extra,
        "files": {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(ckpt: Path) -> str | None:
    """None if every file of the manifest is there with its size and checksum, else the problem."""
    mf = ckpt / MANIFEST
    if not mf.is_file():
        return "no manifest.json"
    try:
        files = json.loads(mf.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "manifest.json is unreadable"
    for rel, want in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {want['size']}"
        if sha256_file(p) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def complete(ckpt_root: Path) -> list[Path]:
    """Checkpoints renamed into place, oldest first: a save is staged in ``.tmp/`` and appears
    under its final name only when complete, manifest included (what a reader beside a
    running job may open)."""
    return sorted(p for p in ckpt_root.glob("step_*") if (p / MANIFEST).is_file())


@contextlib.contextmanager
def without_zip_crc():
    """``torch.save`` without a CRC32 of every record: the manifest's sha256 already covers
    every byte of every file (``verify``), and the CRC pass costs about as much CPU as the write
    itself, on the training path of a synchronous save. ``torch.load`` reads such files."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def latest_valid(ckpt_root: Path, warn=print) -> Path | None:
    """The newest checkpoint that passes ``verify``: the one ``latest`` names, else older ones."""
    pointed = latest(ckpt_root)
    others = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and p != pointed), reverse=True)
    for ckpt in ([pointed] if pointed else []) + others:
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: checkpoint {ckpt} is damaged ({problem}); trying an older one")
    return None



def layout_of(cfg) -> dict[str, int]:
    """What DeepSpeed's own loader needs unchanged to reload its shards (dp only matters where
    ZeRO partitions by it); any other change of layout goes through ``reshard``."""
    p = cfg.parallel
    # ZeRO partitions over dp · cp ranks (parallel/dims.py).
    return {"tp": p.tp, "pp": p.pp, "zero_stage": p.zero_stage, **({"dp": p.dp} if p.zero_stage else {}),
            **({"cp": p.cp} if p.cp > 1 else {})}


NOT_SHAPE = {"dropout", "label_smoothing", "init_std"}
"""Model fields a resumed run may change: they do not change the weights' shapes or meaning."""


def check_compatible(ckpt: Path, model_cfg: dict[str, Any], tokenizer_sha256: str) -> None:
    """Refuse to resume a checkpoint of another model shape or tokenizer (one line, exit 2)."""
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    diff = [k for k in sorted(set(saved) | set(model_cfg))
            if k not in NOT_SHAPE and saved.get(k) != model_cfg.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{ckpt} was trained with model.{k}={saved.get(k)!r}, this run has model.{k}="
            f"{model_cfg.get(k)!r}; use another --run-dir or the same model config"
        )
    saved_tok = manifest(ckpt).get("tokenizer_sha256")
    if saved_tok is not None and saved_tok != tokenizer_sha256:
        raise CheckpointError(
            f"{ckpt} was trained with another tokenizer (sha256 {saved_tok[:12]}, this run "
            f"{tokenizer_sha256[:12]}); use another --run-dir or the same data.tokenizer"
        )


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
        if (candidate / "config.yaml").is_file() and any(candidate.glob("*mp_rank_*_model_states.pt")):
            return candidate
        found = latest(candidate)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path}: not a checkpoint, a checkpoints folder or a run directory with checkpoints"
    )


def saved_config(ckpt: Path):
    """The ``Config`` a checkpoint was trained with."""
    return Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))




# --------------------------------------------------------------------------- safe loading

# Beyond tensors and plain containers, checkpoint files hold numpy arrays (RNG states) and,
# in ZeRO optimizer files, three small DeepSpeed classes. Nothing else may be imported by a
# pickle we open: a shared checkpoint must not be able to run code on the machine that reads it.
ALLOWED_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_globals(deepspeed_classes: bool = True) -> list:
    """The classes of ``ALLOWED_GLOBALS`` (and numpy's dtype classes) for ``weights_only`` loads:
    plain data holders, rebuilt from their fields, so no code of theirs runs. DeepSpeed's only
    when asked: importing it costs seconds, and files of the plain engine never name them."""
    import numpy as np

    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
               *(getattr(np.dtypes, n) for n in np.dtypes.__all__)]
    if deepspeed_classes:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    return allowed


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{path.parent}: unreadable checkpoint file {path.name} ({msg})")


def refuse_unsafe(path: Path) -> list[str]:
    """Refuse, in one line, a pickle that would import anything outside ``ALLOWED_GLOBALS``
    (read from the pickle's opcodes; nothing is loaded or run). For files that a loader we do
    not control opens (DeepSpeed's resume and ZeRO consolidation). Returns the globals it names."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a torch zip file: truncated or not a checkpoint
        raise _unreadable(path, e) from None
    bad = [g for g in found if g not in ALLOWED_GLOBALS]
    if bad:
        raise CheckpointError(
            f"{path}: refused: the file would import {', '.join(bad[:3])} when loaded; a "
            "checkpoint holds tensors and numbers, so it may run code: not opened"
        )
    return found


def refuse_unsafe_files(ckpt: Path) -> None:
    for f in sorted(ckpt.rglob("*.pt")):
        refuse_unsafe(f)


def safe_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of one of our or DeepSpeed's files with ``weights_only=True`` (no code
    runs while unpickling) and the allow-list above; one-line errors."""
    try:
        found = refuse_unsafe(path)
        with torch.serialization.safe_globals(_allowed_globals(any(g.startswith("deepspeed.") for g in found))):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as e:  # torch/pickle/zip errors of a truncated or corrupted file
        raise _unreadable(path, e) from None


