"""Every use of DeepSpeed internals (private or undocumented attributes), in one place.

DeepSpeed is pinned to a tested range (``pyproject.toml``); ``tests/trainer/test_deepspeed_private.py``
checks each item below against the installed DeepSpeed and fails loudly, naming it, when an
upgrade moves or renames one. Keep this list and that test in step.

| what | where DeepSpeed uses it | why we touch it |
| --- | --- | --- |
| ``DeepSpeedEngine.clip_fp32_gradients`` | called by ``_take_model_step`` on the fp32 path (no ZeRO, fp16, bf16) when ``gradient_clipping`` > 0 | our clipping counts pipeline-tied and tensor-parallel parameters once, and keeps the norm |
| ``DeepSpeedEngine._global_grad_norm`` | returned by ``get_global_grad_norm()`` | where our clipping leaves the norm it computed |
| ``PipelineEngine._INSTRUCTION_MAP[OptimizerStep]`` | ``_exec_schedule`` looks up each schedule instruction's method there | run the train module's before-update hooks inside ``train_batch``, after the gradient reductions |
| ``DeepSpeedEngine.skipped_steps`` | counts updates the engine skipped (fp16 overflow, ZeRO's check) | logged, and part of the divergence check |
| ``optimizer.cur_scale`` (ZeRO) / ``optimizer.loss_scale`` (FP16_Optimizer) | the dynamic fp16 loss scale | logged as ``loss_scale`` |
| ``param.ds_pipe_replicated`` | set by ``PipelineModule`` on the second copy of a tied weight | counted once in the gradient norm |
| ``param.tensor_model_parallel`` | read by ``deepspeed.runtime.utils`` norms | marks shards, counted on every tensor rank |
| ``optimizer._lazy_init_hp_params_optimizer_state()`` (ZeRO 1/2, bf16) | links each parameter's fragment to the optimizer state, at the first step | resharding sets Adam's moments before any step (``reshard.apply``) |
| ``DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat`` | the flat fp32 sub-group partitions Adam keeps state for (swapped into its param groups during a step) | resharding creates that state before the first step |
| ``DeepSpeedEngine.checkpoint_engine`` | every checkpoint file DeepSpeed writes goes through its ``save(state, path)`` | ``checkpoint.async`` swaps in a snapshotting stand-in for the length of a save |
| ``DeepSpeedEngine.global_steps``, ``global_samples`` | the engine's counters, restored by its own loader | restored by ours when resharding |
| ``FP16_Optimizer.fp32_groups_flat`` / ``FP16_UnfusedOptimizer.fp32_groups``, ``fp16_groups`` | the fp32 master weights and the bf16/fp16 weights they were copied from (fp16, and bf16 without ZeRO or a pipeline) | undoing the zero-gradient Adam step their constructor takes; naming, reading and resharding the unfused wrapper's masters (its ``state_dict`` saves them as ``fp32_groups``) |

Checkpoint file names are DeepSpeed's too (``mp_rank_XX_model_states.pt``,
``zero_pp_rank_*``, pipeline ``layer_XX-model_YY-model_states.pt``): ``trainer/checkpoint/``
and ``trainer/checkpoint/consolidate.py`` read them, and the consolidation tests of every layout
(``tests/trainer/parallel/test_layouts.py``, ZeRO-3 export) fail if they change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

PIPE_REPLICATED = "ds_pipe_replicated"
TENSOR_PARALLEL = "tensor_model_parallel"


def replace_fp32_clipping(engine, clip: Callable[[], torch.Tensor]) -> None:
    """Make the engine call ``clip()`` where it would clip fp32 gradients itself, and report the
    norm ``clip`` returns from ``get_global_grad_norm()``."""

    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_and_keep_norm


def before_pipeline_update(engine, fn: Callable[[], None]) -> None:
    """Make a pipeline engine call ``fn()`` where its schedule reaches the optimizer step: after
    the tied and data-parallel gradient reductions, before the update (``train_batch`` runs the
    whole schedule in one call). The map is replaced on this engine only."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    step = engine._INSTRUCTION_MAP[OptimizerStep]

    def hooked(self, **kwargs) -> None:
        fn()
        step(self, **kwargs)

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, OptimizerStep: hooked}


def skipped_steps(engine) -> int:
    """Updates the engine itself skipped (host counter)."""
    return int(engine.skipped_steps)


def loss_scale(optimizer) -> float | None:
    """The fp16 dynamic loss scale of DeepSpeed's wrapped optimizer, if it has one."""
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return None if scale is None else float(scale)


def is_pipe_replicated(p: torch.Tensor) -> bool:
    return bool(getattr(p, PIPE_REPLICATED, False))


def is_tensor_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, TENSOR_PARALLEL, False))


def link_optimizer_states(optimizer) -> None:
    """ZeRO 1/2 and bf16 link a parameter's view of Adam's state (what
    ``safe_set_full_optimizer_state`` writes through) only at the first step; do it now, once
    the states exist. ZeRO-3 and the plain optimizer need nothing."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def zero3_fp32_partitions(optimizer) -> list[torch.Tensor]:
    """ZeRO-3's flat fp32 partitions, one per sub-group (none for other optimizers)."""
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", []))


def mark_tensor_parallel(shard: torch.Tensor, like: torch.Tensor, dim: int) -> None:
    """Tag a tensor-parallel shard (DeepSpeed counts untagged parameters in gradient norms on
    tensor rank 0 only); keep the pipeline's replica mark of the tensor it came from."""
    setattr(shard, TENSOR_PARALLEL, True)
    shard.partition_dim = dim
    if is_pipe_replicated(like):
        setattr(shard, PIPE_REPLICATED, True)


def undo_initial_optimizer_step(optimizer) -> None:
    """DeepSpeed's fp16 wrappers (also bf16 without ZeRO or a pipeline) "initialise optimizer
    states" by stepping Adam once on zero gradients: its step count starts at 1, so the first
    real update is scaled by step 2's bias corrections (0.735 × the learning rate with
    betas 0.9/0.95) and decoupled weight decay has already shrunk the fp32 master copy. Put back
    what an untouched Adam would have: step 0, and masters equal to the weights they were
    copied from (the moments are exact zeros after a zero-gradient step). ZeRO and
    BF16_Optimizer create their state without a step: nothing to undo."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _flatten_dense_tensors

    with torch.no_grad():
        if isinstance(optimizer, FP16_Optimizer):  # one flat master per group
            for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups, strict=True):
                flat.copy_(_flatten_dense_tensors([p.detach().to(flat.dtype) for p in group]))
        elif isinstance(optimizer, FP16_UnfusedOptimizer):  # a master per parameter
            for masters, group in zip(optimizer.fp32_groups, optimizer.fp16_groups, strict=True):
                for m, p in zip(masters, group, strict=True):
                    m.copy_(p)
        else:
            return
    for state in optimizer.optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                v.zero_()
            elif k == "step":
                state[k] = 0


def unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """DeepSpeed's unfused fp16/bf16 wrapper (ZeRO 0 around a torch optimizer): ``id`` of each
    bf16/fp16 parameter ► its fp32 master, the tensor the torch optimizer's state is keyed by
    (in the order of that optimizer's groups). Empty for every other optimizer."""
    if "deepspeed" not in sys.modules:  # the plain engine: no wrapper, and no import of it
        return {}
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(p): m for half, full in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
            for p, m in zip(half, full, strict=True)}


def zero3_partitioner(ds_config: dict, dp_group) -> Callable[[torch.nn.Parameter], None]:
    """Partition one whole parameter over ``dp_group`` as ``deepspeed.zero.Init(module=...)``
    does for an allocated model, one parameter at a time (sharded construction).

    Without ``Init``'s broadcast from the first rank: every rank made the same numbers (the
    name-seeded values or the same file), so it would move the model over the network for nothing.
    """
    from deepspeed import zero

    init = zero.Init(data_parallel_group=dp_group, config_dict_or_path=ds_config)

    def partition(p: torch.nn.Parameter) -> None:
        init._convert_to_deepspeed_param(p)
        p.partition()

    return partition
