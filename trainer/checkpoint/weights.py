"""Whole single-device weights by name (``Weights``, read lazily where the format allows) and
the one check that a model and stored weights fit (``match_weights``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trainer.errors import CheckpointError


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


