"""Reading checkpoints back: resuming a run (in its own layout through DeepSpeed's loader, in
another through ``reshard``), and whole single-device weights of any layout for inference,
evaluation, export and ``train.init_from``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

import models
from models import fused_qkv
from trainer import distributed
from trainer.checkpoint import reshard
from trainer.checkpoint.consolidate import consolidate, consolidate_lazily
from trainer.checkpoint.format import (
    FORMAT,
    check_compatible,
    latest_valid,
    layout_of,
    manifest,
    rank_state_file,
    refuse_unsafe_files,
    resolve,
    safe_load,
    saved_config,
)
from trainer.checkpoint.weights import Weights, match_weights
from trainer.errors import CheckpointError


class Restored(NamedTuple):
    path: Path
    """The checkpoint directory resumed from."""
    client_state: dict[str, Any]
    """The loop's state as saved (step, tokens, skipped updates, RNG states)."""
    rank_state: dict[str, Any] | None
    """This rank's own state (carried recurrent states), if it saved one."""


def load(module, ckpt_root: Path, cfg, tokenizer_sha256: str, warn=print) -> Restored | None:
    """Collective: resume ``module`` (weights, optimizer, scheduler) from the newest intact
    checkpoint under ``ckpt_root``, after checking it has this run's model shape, tokenizer and
    layout. None when there is nothing to resume."""
    ckpt = latest_valid(ckpt_root, warn=warn)
    if ckpt is None:
        return None
    check_compatible(ckpt, cfg.model.model_dump(mode="json"), tokenizer_sha256)
    # Before format 2, attention projections were separate tensors: DeepSpeed's own loader
    # would put them in the fused parameters' places, so the resharding reader maps them.
    legacy = manifest(ckpt).get("format", 1) < FORMAT and cfg.model.family in fused_qkv.LEGACY
    if layout_of(saved_config(ckpt)) != layout_of(cfg) or legacy:
        return _load_resharded(module, ckpt, cfg, warn)
    refuse_unsafe_files(ckpt)  # DeepSpeed's loader unpickles without restrictions
    client_state = module.load_checkpoint(ckpt_root, ckpt.name)
    f = rank_state_file(ckpt, distributed.rank())
    rank_state = safe_load(f) if f.is_file() else None
    return Restored(ckpt, client_state, rank_state)


def _load_resharded(module, ckpt: Path, cfg, warn) -> Restored:
    """Resume a checkpoint of another layout: weights, Adam's moments and step, schedule, data
    position and the loop's RNG state carry over exactly; per-rank files do not (see
    ``docs/checkpoints.md``)."""
    saved = saved_config(ckpt)
    state = reshard.read(ckpt, saved)
    dims = module.dims
    reshard.apply(module, state, cfg, dims)
    fmt = lambda p: f"dp {p.dp}, tp {p.tp}, pp {p.pp}, {f'cp {p.cp}, ' if p.cp > 1 else ''}zero {p.zero_stage}"  # noqa: E731
    warn(f"resharded {ckpt.name} from {fmt(saved.parallel)} to {fmt(cfg.parallel)} "
         "(weights, Adam moments and step, LR schedule, data position, rank 0's RNG state)")
    f = rank_state_file(ckpt, 0)
    if f.is_file() and set(safe_load(f)) != {"cuda_rng"}:  # more than the CUDA generator
        warn("per-rank state (carried recurrent states) does not carry across layouts: those "
             "streams start from zero, as after a new segment")
    return Restored(ckpt, state.rank0, None)


def _model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    cfg = saved_config(ckpt)
    if cfg.parallel.zero_stage >= 1:
        # Master weights live in the (sharded) optimizer state: the resharding reader's.
        return reshard.weights(ckpt, cfg)
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        return consolidate(ckpt, cfg)
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt}: no model states file (an incomplete checkpoint)")
    # Memory-mapped: a reader that takes one tensor at a time touches only that tensor's pages.
    return {k: v.float() for k, v in safe_load(files[0], mmap=True)["module"].items()}


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint, whatever its layout (consolidated on the CPU), under
    today's names (a checkpoint from before the q/k/v fusion is fused)."""
    return fused_qkv.upgrade_for(_model_state(ckpt), saved_config(ckpt).model)


def read_weights(source: str | Path, label: str, model_cfg) -> Weights:
    """Whole weights from a checkpoint or run directory (any layout, consolidated) or a
    ``.safetensors`` file, under the names of today's ``model_cfg`` model (checkpoints from
    before the q/k/v fusion are fused as they are read)."""
    return with_fused_qkv(_read_weights(source, label), model_cfg)


def with_fused_qkv(stored: Weights, model_cfg) -> Weights:
    """``stored`` with the separate q/k/v projections of a checkpoint from before the fusion
    (``models/fused_qkv.py``) presented as today's fused tensors, each fused when it is read."""

    fusions = fused_qkv.legacy_names(list(stored), model_cfg.family) if model_cfg is not None else {}
    if not fusions:
        return stored
    head_dim = model_cfg.d_model // model_cfg.n_head
    old = {s for srcs in fusions.values() for s in srcs}
    shapes = {k: v for k, v in stored.shapes.items() if k not in old}
    for new, srcs in fusions.items():
        rows, *rest = stored.shapes[srcs[0]]
        shapes[new] = (rows * len(srcs), *rest)

    def get(name: str) -> torch.Tensor:
        srcs = fusions.get(name)
        return stored[name] if srcs is None else fused_qkv.fuse([stored[s] for s in srcs], head_dim)

    return Weights(shapes, get)


def _read_weights(source: str | Path, label: str) -> Weights:
    from safetensors import safe_open

    path = Path(source)
    if path.is_dir():
        ckpt = resolve(path)
        cfg = saved_config(ckpt)
        if cfg.parallel.zero_stage == 0 and cfg.parallel.tp * cfg.parallel.pp > 1:
            return consolidate_lazily(ckpt, cfg)
        # ZeRO's master weights lie flat in its optimizer partitions: consolidated whole.
        return Weights.of(load_model_state(ckpt))
    if not path.is_file():
        raise CheckpointError(f"{label}: no such file or checkpoint directory")
    try:
        f = safe_open(str(path), "pt")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no iterator)
    except Exception as e:  # safetensors raises plain errors on corrupt files
        raise CheckpointError(f"{label}: cannot load ({str(e).splitlines()[0]})") from None
    return Weights(shapes, f.get_tensor)


def load_weights(model: torch.nn.Module, source: str | Path | dict[str, torch.Tensor],
                 rename=None, label: str | None = None, model_cfg=None) -> None:
    """Copy whole single-device weights into a materialised ``model``: the one weight loader
    (inference, evaluation, export, pipeline stages' ``init_from``; sharded construction reads
    through ``match_weights`` itself).

    ``source``: a checkpoint or run directory of any layout, a safetensors file, or a state
    dict. ``model_cfg``: the model's config (default: ``model.cfg``; a pipeline stage has none).
    """
    label = label or str(source)
    model_cfg = model_cfg or getattr(model, "cfg", None)
    stored = with_fused_qkv(Weights.of(source), model_cfg) if isinstance(source, dict) else \
        read_weights(source, label, model_cfg)
    with torch.no_grad():
        for p, _, src in match_weights(model, stored, rename, label):
            p.copy_(stored[src])


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any, Path]:
    """(single-device model with the checkpoint's weights, its config, the checkpoint
    directory) from a run directory, checkpoints folder or checkpoint of any layout."""
    ckpt = resolve(path)
    cfg = saved_config(ckpt)
    model = models.build(cfg.model)
    load_weights(model, load_model_state(ckpt), label=str(ckpt))
    return model, cfg, ckpt


def run_tokenizers(ckpt: Path):
    """(source, target) tokenizers of the run a checkpoint belongs to (the same one twice for a
    language model or a shared vocabulary)."""
    from tokenizers import Tokenizer

    run_dir = ckpt.parent.parent

    def side(name: str):
        for f in ("tokenizer.json", f"{name}_tokenizer.json"):
            if (run_dir / f).is_file():
                return Tokenizer.from_file(str(run_dir / f))
        raise CheckpointError(f"no tokenizer.json in the run directory {run_dir}")

    return side("src"), side("tgt")
