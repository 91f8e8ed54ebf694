"""Sharded construction: each rank materialises only the parameters it keeps.

The model is built on the meta device (shapes, no memory, no values) and tensor parallelism is
applied there; then ``materialize`` visits the parameters one at a time: the whole parameter is
made on the CPU (its name-seeded initial value, or ``train.init_from``'s tensor), this rank's
tensor-parallel slice is cut from it, cast, moved to the device and, under ZeRO-3, partitioned
over the data-parallel ranks before the next parameter exists. A rank's peak is what it keeps
plus one whole parameter, never the model, and the numbers are exactly the single-device
model's, so every layout starts equal (the parity matrix and bitwise resume depend on it).

Models that support it have ``init_weight(name, tensor)`` (and ``init_buffers(device)`` when
they hold computed buffers); the others are built whole, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

import models
from trainer import host_memory
from trainer.config import Config

Values = Callable[[str, tuple[int, ...]], torch.Tensor]
"""(single-device name, whole shape) ► the whole tensor on the CPU."""


def supported(model_cls: type) -> bool:
    return hasattr(model_cls, "init_weight")


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device with torch's default initialisers skipped (as
    ``transformers``' ``no_init_weights`` does): every value is made later, and the first
    initialiser run on a meta tensor imports torch's Python meta kernels (hundreds of modules:
    start-up time and resident memory every rank would pay) for nothing."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, _skip_init)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _skip_init(*args, **kwargs) -> torch.Tensor:
    """An initialiser that leaves its tensor alone (``torch.overrides`` may pass the tensor by
    keyword, as ``nn.MultiheadAttention``'s ``constant_`` calls are dispatched)."""
    return args[0] if args else kwargs["tensor"]


def whole_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the single-device parameter ``p`` is (a slice of)."""
    where = getattr(p, "tp_slice", None)
    return where.shape if where is not None else tuple(p.shape)


def initial_values(model: nn.Module) -> Values:
    def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.empty(shape)
        model.init_weight(name, t)
        return t

    return value


@torch.no_grad()
def materialize(model: nn.Module, values: Values, device: torch.device, dtype: torch.dtype | None = None,
                partition: Callable[[nn.Parameter], None] | None = None) -> nn.Module:
    """Give every meta parameter of ``model`` its values, in place (the ``Parameter`` objects
    stay the same, so tied weights stay tied and tags set on them survive)."""
    for name, p in list(model.named_parameters()):  # tied weights once, under their first name
        if not p.is_meta:
            continue
        whole = values(name, whole_shape(p))
        where = getattr(p, "tp_slice", None)
        part = where.of(whole) if where is not None else whole
        # A copy, never a view: a view would keep the whole parameter alive.
        real = torch.empty(part.shape, device=device, dtype=dtype or p.dtype).copy_(part)
        del whole, part
        tags = dict(p.__dict__)
        torch.utils.swap_tensors(p, nn.Parameter(real, requires_grad=p.requires_grad))
        p.__dict__.update(tags)
        if partition is not None:
            partition(p)
        host_memory.release_freed_memory()
    if any(b.is_meta for b in model.buffers()):
        model.init_buffers(device)
    return model


def reference_model(cfg: Config) -> torch.nn.Module:
    """The whole single-device model on the meta device (no memory, no init): for parameter
    counts and FLOPs when this rank holds only a shard or a stage of it, and for the scaling
    planner.

    Built under ``torch.device("meta")`` (``materialize.on_meta``), not accelerate's
    ``init_empty_weights``: that one re-registers every parameter as it is assigned, which unties
    tied weights (the GPT's head and embedding), so tied models would count their embedding twice.
    """
    with on_meta():
        return models.build(cfg.model, seed=cfg.train.seed)
