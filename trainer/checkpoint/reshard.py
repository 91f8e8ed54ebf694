"""Resume a checkpoint in another layout: weights, Adam's moments and step, online at load.

DeepSpeed reloads its shards only into the layout that wrote them. Here a checkpoint of any
layout is read into one layout-free state (whole single-device tensors per parameter name:
the fp32 master weight, ``exp_avg``, ``exp_avg_sq``; Adam's step count) and each rank of the
new layout takes its slice of it, the way Megatron-LM and torchtitan reshard at load (DeepSpeed
itself needs an offline ``ds_to_universal`` pass). What each DeepSpeed file holds, and how a
layout change maps it, is written down in ``docs/checkpoints.md``.

Reading, per model-parallel rank (pipeline stage ``s``, tensor rank ``t``) of the old layout:

- ZeRO 0: ``mp_rank_XX_model_states.pt`` holds the torch optimizer's per-parameter state by
  index; the names in that order are ours (``optimizer_param_names``, saved beside it), the
  weights the module's (fp32 runs: they are the master copy). bf16/fp16 runs hold DeepSpeed's
  unfused wrapper's state instead: the torch state under ``optimizer_state_dict`` and the fp32
  masters, in the same order, under ``fp32_groups``.
- ZeRO 1/2: ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` holds data rank ``D``'s slice of
  each parameter group's flat buffer (master weights and moments alike); concatenated over
  ``D`` the buffer lists the group's parameters back to back in ``param_shapes`` order.
  ``BF16_Optimizer`` (bf16 under ZeRO 1 with fp32 accumulation, or in a pipeline) writes the
  same state to ``bf16_zero_pp_rank_D_...`` files.
- ZeRO 3: every parameter is split on its own, ``ceil(numel / dp)`` elements per data rank,
  one parameter after another in each rank's flat buffer.

Tensor shards are merged by ``consolidate.merge_tensor_parallel``, pipeline names mapped by
``pipeline.single_device_name``: the same code ``eval``, ``export`` and ``init_from`` consolidate
weights with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.fused_qkv import upgrade_for
from trainer import deepspeed_private
from trainer.checkpoint.consolidate import layer_files, merge_tensor_parallel
from trainer.checkpoint.format import safe_load
from trainer.errors import CheckpointError
from trainer.parallel.pipeline import single_device_name
from trainer.parallel.tensor import shard_dim

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
"""What a parameter carries across layouts: its master weight and Adam's two moments."""

NAMES_KEY = "optimizer_param_names"
"""Client-state key under which a ZeRO-0 rank saves its optimizer's parameter names, in order."""


@dataclass
class LayoutFreeState:
    """A checkpoint's training state with no layout left in it."""

    tensors: dict[str, dict[str, torch.Tensor]]
    """``KEYS`` ► single-device parameter name ► whole fp32 tensor."""
    adam_step: float
    """Adam's step count (updates applied: skipped non-finite steps not counted)."""
    rank0: dict[str, Any]
    """The first model-parallel rank's model-states file: the loop's client state, the LR
    scheduler, DeepSpeed's step counters."""


def weights(ckpt: Path, cfg) -> dict[str, torch.Tensor]:
    """Whole fp32 master weights of a ZeRO 1-3 checkpoint of any layout, under every name of a
    tied weight (what ``eval``, ``export``, ``generate`` and ``train.init_from`` load)."""
    state = read(ckpt, cfg, keys=("fp32",))
    out = state.tensors["fp32"]
    if cfg.parallel.pp > 1:  # the pipeline ties through its tied module (local names)
        if getattr(cfg.model, "tie_embeddings", False):
            out["lm_head.weight"] = out["wte.weight"]
        return out
    for alias, name in (state.rank0.get("shared_params") or {}).items():
        out[alias] = out[name]
    return out


def read(ckpt: Path, cfg, keys: tuple[str, ...] = KEYS) -> LayoutFreeState:
    """The layout-free state of checkpoint ``ckpt`` (``cfg``: the config it was saved with);
    ``keys``: which of ``KEYS`` to read (all: resuming; the master weights: consolidating)."""
    p = cfg.parallel
    if p.zero_stage == 3 and p.tp * p.pp > 1:
        raise CheckpointError(f"{ckpt}: ZeRO-3 shards of a tensor- or pipeline-parallel run cannot be "
                              "resharded; resume it in its own layout")
    per_tp: list[dict[str, dict[str, torch.Tensor]]] = []
    steps: set[float] = set()
    for t in range(p.tp):
        merged: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
        for s in range(p.pp):
            local, step = _rank_tensors(ckpt, cfg, s * p.tp + t, keys)
            steps.add(step)
            for k in keys:
                merged[k].update(_single_device_names(local[k], cfg, pipeline=p.pp > 1))
        per_tp.append(merged)
    if len(steps) != 1:
        raise CheckpointError(f"{ckpt}: ranks disagree on Adam's step count {sorted(steps)}")
    # Weights and Adam's moments of a checkpoint from before the q/k/v fusion under today's
    # names (fusing is a permutation of rows, elementwise exact).
    tensors = {k: upgrade_for(merge_tensor_parallel([r[k] for r in per_tp], cfg.model.family), cfg.model)
               for k in keys}
    return LayoutFreeState(tensors, steps.pop(), safe_load(_model_states_file(ckpt, p.zero_stage, 0)))


def _model_states_file(ckpt: Path, stage: int, mp: int) -> Path:
    name = f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if stage == 3 else f"mp_rank_{mp:02d}_model_states.pt"
    f = ckpt / name
    if not f.is_file():
        raise CheckpointError(f"{ckpt}: missing {name} (an incomplete checkpoint)")
    return f


def _bf16_optimizer(ckpt: Path, mp: int) -> bool:
    """Whether DeepSpeed's ``BF16_Optimizer`` wrote this rank's state (ZeRO 1's flat partitions,
    under a "bf16_" prefix; also at ZeRO 0 in a pipeline)."""
    return (ckpt / f"bf16_zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt").is_file()


def _optim_files(ckpt: Path, dp: int, mp: int) -> list[dict[str, Any]]:
    prefix = "bf16_" if _bf16_optimizer(ckpt, mp) else ""
    files = [ckpt / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt" for d in range(dp)]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: missing {f.name} (an incomplete checkpoint)")
    return [safe_load(f)["optimizer_state_dict"] for f in files]


def _rank_tensors(ckpt: Path, cfg, mp: int, keys: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """(``KEYS`` ► local name ► tensor, Adam step) of one model-parallel rank, whole over dp."""
    p = cfg.parallel
    states = safe_load(_model_states_file(ckpt, p.zero_stage, mp))
    if p.zero_stage == 0 and not _bf16_optimizer(ckpt, mp):
        return _zero0_tensors(ckpt, cfg, states, mp)
    optim = _optim_files(ckpt, p.dp * p.cp, mp)  # ZeRO partitions over dp · cp ranks
    z3 = p.zero_stage == 3
    base = [o["optimizer_state_dict" if z3 else "base_optimizer_state"] for o in optim]
    # Per data rank, per parameter group: that rank's slice of the group's flat buffer.
    flats = {"fp32": [o["fp32_flat_groups" if z3 else "single_partition_of_fp32_groups"] for o in optim]}
    for k in KEYS[1:]:
        flats[k] = [[st[k] for _, st in sorted(b["state"].items())] for b in base]
    shapes = [{n: torch.Size(s) for n, s in g.items()} for g in states["param_shapes"]]
    split = _split_zero3 if z3 else _split_zero12
    return {k: split(flats[k], shapes) for k in keys}, _adam_step(base[0]["state"])


def _split_zero12(flats: list[list[torch.Tensor]], groups: list[dict[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """ZeRO 1/2: a group's buffer is its data ranks' slices end to end; its parameters lie in
    it back to back (padding only at the end)."""
    out = {}
    for g, shapes in enumerate(groups):
        buffer = torch.cat([rank[g] for rank in flats])
        offset = 0
        for name, shape in shapes.items():
            out[name] = buffer[offset:offset + shape.numel()].view(shape).clone()
            offset += shape.numel()
    return out


def _split_zero3(flats: list[list[torch.Tensor]], groups: list[dict[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """ZeRO 3: each parameter's ``ceil(numel / dp)``-element slices, one per data rank, at the
    same offset of every rank's buffer (all groups end to end; the last slice padded)."""
    ranks, dp = [torch.cat(rank) for rank in flats], len(flats)
    out, offset = {}, 0
    for shapes in groups:
        for name, shape in shapes.items():
            part = math.ceil(shape.numel() / dp)
            out[name] = torch.cat([r[offset:offset + part] for r in ranks])[:shape.numel()].view(shape).clone()
            offset += part
    return out


def _zero0_tensors(ckpt: Path, cfg, states: dict[str, Any], mp: int) -> tuple[dict, float]:
    names = states.get(NAMES_KEY)
    if names is None:
        raise CheckpointError(f"{ckpt} was saved before checkpoints named their optimizer's parameters; "
                              "resume it in its own layout, or start a new run with train.init_from")
    opt, masters = states["optimizer"], None
    if "fp32_groups" in opt:  # DeepSpeed's unfused bf16/fp16 wrapper: masters beside the torch state
        masters = [m.float() for group in opt["fp32_groups"] for m in group]
        opt = opt["optimizer_state_dict"]
    order = [i for g in opt["param_groups"] for i in g["params"]]
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KEYS}
    for i, name in zip(order, names, strict=True):
        for k in KEYS[1:]:
            out[k][name] = opt["state"][i][k]
    out["fp32"] = (dict(zip(names, masters, strict=True)) if masters is not None
                   else _zero0_weights(ckpt, cfg, states, mp, names))
    return out, _adam_step(opt["state"])


def _zero0_weights(ckpt: Path, cfg, states: dict[str, Any], mp: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Module weights under their local names (a pipeline stage: from its layer files)."""
    if states["module"] is not None:
        return {n: states["module"][n].float() for n in names}
    local: dict[str, torch.Tensor] = {}
    for idx, f in layer_files(ckpt, mp % cfg.parallel.tp):
        local.update({f"{idx}.{k}": v for k, v in safe_load(f).items()})
    # The embedding layer's file holds the tied module under its layer index 0.
    return {n: local[_layer_key(n)].float() for n in names}


def _layer_key(name: str) -> str:
    """``tied_modules.embed.wte.weight`` ► ``0.wte.weight``; ``3.attn.c_attn.weight`` as is."""
    parts = name.split(".")
    return "0." + ".".join(parts[2:]) if parts[0] == "tied_modules" else name


def _adam_step(state: dict[int, dict[str, Any]]) -> float:
    steps = {float(st["step"]) for st in state.values()}
    if len(steps) != 1:
        raise CheckpointError(f"parameters disagree on Adam's step count {sorted(steps)}")
    return steps.pop()


def _single_device_names(local: dict[str, torch.Tensor], cfg, pipeline: bool) -> dict[str, torch.Tensor]:
    if not pipeline:
        return local
    out = {}
    for n, v in local.items():
        name = single_device_name(n, cfg.model)
        if name is not None:  # a last stage's copy of a tied weight: the first stage has it
            out[name] = v
    return out


# --------------------------------------------------------------------------- the new layout


def optimizer_param_names(engine) -> list[str] | None:
    """This rank's optimizer's parameter names in its state's order, for a ZeRO-0 save (ZeRO's
    own files name their parameters: ``param_shapes``)."""
    opt = engine.optimizer
    masters = deepspeed_private.unfused_masters(opt)
    if masters:  # its torch optimizer holds the masters, in the order of the module's weights
        of = {id(m): p for p, m in masters.items()}
        held = [of[id(m)] for g in opt.param_groups for m in g["params"]]
    elif not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "bit16_groups"):
        return None
    else:
        held = [id(p) for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[i] for i in held]


def apply(module, state: LayoutFreeState, cfg, dims) -> None:
    """Collective (ZeRO-3 gathers each parameter): give every parameter of ``module`` (a train
    module of the new layout, just built) its slice of ``state``, Adam's step included, and
    the LR scheduler and DeepSpeed's counters their saved values."""
    engine = module.engine
    _create_adam_state(engine)
    deepspeed_private.link_optimizer_states(engine.optimizer)
    rename = _local_to_single(cfg) if dims.pp > 1 else (lambda n: n)
    masters = deepspeed_private.unfused_masters(engine.optimizer)
    for name, p in engine.module.named_parameters():
        whole = rename(name)
        v = {k: _local_slice(state.tensors[k][whole], whole, cfg, dims) for k in KEYS}
        _set_parameter(engine, p, v, masters.get(id(p), p))
    for st in _base_optimizer(engine).state.values():
        st["step"].fill_(state.adam_step)  # every held tensor's, whichever sub-group it is
    # The scheduler sets a group's rate after each update, so the next update's rate is the one
    # it last set: what the saved optimizer's groups held.
    rates = load_scheduler(module.scheduler, state.rank0["lr_scheduler"])
    for g, lr in zip(_base_optimizer(engine).param_groups, rates, strict=True):
        g["lr"] = lr
    engine.global_steps = state.rank0["global_steps"]
    engine.global_samples = state.rank0["global_samples"]


def load_scheduler(sched, state: dict[str, Any]) -> list[float]:
    """Restore a saved schedule's position into a scheduler of another layout, whose groups may
    differ (a pipeline stage without embeddings has no μP embedding group): the step is the
    saved one, each group's base rate stays this layout's. Returns the groups' rates now."""
    base = list(sched.base_lrs)
    sched.load_state_dict(state)
    sched.base_lrs = base
    sched._last_lr = [b * f(sched.last_epoch) for b, f in zip(base, sched.lr_lambdas, strict=True)]
    return sched.get_last_lr()


def _create_adam_state(engine) -> None:
    """Adam creates its state at the first step; a resharded run writes into it before that."""
    opt = _base_optimizer(engine)
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    held = [q for g in opt.param_groups for q in g["params"]]
    for q in held + deepspeed_private.zero3_fp32_partitions(engine.optimizer):
        if not opt.state.get(q):
            opt.state[q] = {"step": torch.tensor(0.0, device=q.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(q), "exp_avg_sq": torch.zeros_like(q)}


def _local_to_single(cfg):
    # A stage's parameters are deduplicated: the tied embedding appears once, as its ``wte``.
    return lambda n: single_device_name(n, cfg.model)


def _local_slice(whole: torch.Tensor, name: str, cfg, dims) -> torch.Tensor:
    dim = shard_dim(name, cfg.model.family) if dims.tp > 1 else None
    return whole if dim is None else whole.chunk(dims.tp, dim=dim)[dims.tp_rank]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrapper (ZeRO, bf16), or the engine's own."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _set_parameter(engine, p: torch.nn.Parameter, v: dict[str, torch.Tensor], master: torch.Tensor) -> None:
    """``master``: the tensor the torch optimizer keys ``p``'s state by at ZeRO 0 (``p`` itself
    in fp32, its fp32 master under DeepSpeed's unfused bf16/fp16 wrapper)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id"):  # ZeRO-3: the partition lives apart from the module's parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(v["fp32"])
    else:
        with torch.no_grad():
            p.copy_(v["fp32"])
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO 1-3, bf16: fp32 master apart
        safe_set_full_fp32_param(p, v["fp32"])
        for k in KEYS[1:]:
            safe_set_full_optimizer_state(p, v[k], k)
        return
    opt = _base_optimizer(engine)
    if master not in opt.state:
        raise CheckpointError("this layout's optimizer holds neither its parameters nor DeepSpeed's "
                              "fp32 masters of them: resharding into it is not supported")
    with torch.no_grad():
        master.copy_(v["fp32"])
    for k in KEYS[1:]:
        opt.state[master][k].copy_(v[k])
