"""Checkpoints, the one module that knows their format: saving and resuming (driven by the
``Checkpoint`` callback), manifests, layout checks, per-rank states, and reading weights back
(``train.init_from``, ``generate``, ``eval``, ``export``).

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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from models import fused_qkv
from trainer import distributed
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


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never ``protect`` (the one just
    written and pointed to by ``latest``)."""
    tags = sorted(p.name for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old != protect:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)


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
    from trainer.parallel import reshard

    saved = saved_config(ckpt)
    state = reshard.read(ckpt, saved)
    dims = module.dims
    reshard.apply(module, state, cfg, dims)
    fmt = lambda p: f"dp {p.dp}, tp {p.tp}, pp {p.pp}, {f'cp {p.cp}, ' if p.cp > 1 else ''}zero {p.zero_stage}"  # noqa: E731
    warn(f"resharded {ckpt.name} from {fmt(saved.parallel)} to {fmt(cfg.parallel)} "
         "(weights, Adam moments and step, LR schedule, data position, rank 0's RNG state)")
    if any(ckpt.glob("rank_state_*.pt")):
        warn("per-rank state (carried recurrent states) does not carry across layouts: those "
             "streams start from zero, as after a new segment")
    return Restored(ckpt, state.rank0, None)


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
    import yaml

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


def _model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    cfg = saved_config(ckpt)
    if cfg.parallel.zero_stage >= 1:
        from trainer.parallel.reshard import weights

        # Master weights live in the (sharded) optimizer state: the resharding reader's.
        return weights(ckpt, cfg)
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        from trainer.parallel.consolidate import consolidate

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


# --------------------------------------------------------------------------- weights


class Weights(Mapping):
    """Whole single-device weights by name, read one tensor at a time where the format allows
    (safetensors, a memory-mapped ZeRO-0 file): sharded construction never holds them all."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], get) -> None:
        self.shapes, self._get = shapes, get

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Weights:
        return cls({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._get(name)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


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
            from trainer.parallel.consolidate import consolidate_lazily

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


def match_weights(model: torch.nn.Module, stored: Mapping, rename=None, label: str = "weights",
                  shape_of=lambda p: tuple(p.shape)) -> list[tuple[torch.nn.Parameter, str, str]]:
    """``(parameter, its name in the model, its name in stored)`` for every parameter of
    ``model``, after checking that names and shapes fit (one line otherwise).

    ``rename`` maps the model's parameter names to the source's single-device names (``None``
    from it: a parameter not stored, e.g. a pipeline's second copy of a tied weight). A tied
    weight is one parameter under several names; the source may hold it under any of them.
    ``shape_of`` gives the whole shape a parameter must have in ``stored``.
    """
    shapes = stored.shapes if isinstance(stored, Weights) else {k: tuple(v.shape) for k, v in stored.items()}
    params: dict[int, tuple[torch.Tensor, str, list[str]]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        v = rename(n) if rename else n
        if v is not None:
            params.setdefault(id(p), (p, n, []))[2].append(v)
    missing, bad_shape, used, pairs = [], [], set(), []
    for p, n, names in params.values():
        src = next((v for v in names if v in shapes), None)
        if src is None:
            missing.append(names[0])
        elif shapes[src] != shape_of(p):
            bad_shape.append(f"{src} {shapes[src]} vs {shape_of(p)}")
        pairs.append((p, n, src))
        used.update(names)
    unexpected = sorted(shapes.keys() - used)
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{label}: weights do not fit model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {bad_shape[:2]})")
    return pairs


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


def saved_config(ckpt: Path):
    """The ``Config`` a checkpoint was trained with."""
    import yaml

    from trainer.config import Config

    return Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any, Path]:
    """(single-device model with the checkpoint's weights, its config, the checkpoint
    directory) from a run directory, checkpoints folder or checkpoint of any layout."""
    import models

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
