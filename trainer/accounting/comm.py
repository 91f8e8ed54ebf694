"""Communication accounting: every collective and point-to-point transfer this process starts,
counted by kind, process group and bytes.

``install`` wraps torch.distributed's functions (before DeepSpeed's communication backend binds
them, so its all-gathers and reduce-scatters are counted too; ``setup`` installs it right after
the process group exists). Every wrapper records then calls the original: nothing changes in
what runs. Nested calls (a deprecated name forwarding to its successor) count once, and only
the thread that installed counts (the asynchronous checkpoint writer's barriers are not
training traffic).

Bytes are each call's **payload**: the tensor of an all-reduce, broadcast or send, the whole
gathered output of an all-gather, the whole input of a reduce-scatter, this rank's input of an
all-to-all. What a ring puts on each link follows from it (``WIRE``); the analytic
volumes (``trainer/accounting/comm_volume.py``) are payloads too, so the two compare directly.

Groups are named by the axes their ranks differ along (``ParallelDims``): ``tp``, ``dp``,
``cp``, ``pp``, ``dp+cp`` (DeepSpeed's data group under context parallelism), ``world``,
``self`` (a group of one: DeepSpeed still calls it); a point-to-point transfer by the axes
between this rank and its peer.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

# torch.distributed function ► (kind, the parameter holding its payload)
FUNCTIONS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "all_gather": ("all_gather", "tensor_list"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "all_gather_single": ("all_gather", "output_tensor"),
    "_all_gather_base": ("all_gather", "output_tensor"),
    "all_gather_coalesced": ("all_gather", "output_tensor_lists"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "_reduce_scatter_base": ("reduce_scatter", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "all_to_all": ("all_to_all", "input_tensor_list"),
    "broadcast": ("broadcast", "tensor"),
    "reduce": ("reduce", "tensor"),
    "send": ("send", "tensor"), "isend": ("send", "tensor"),
    "recv": ("recv", "tensor"), "irecv": ("recv", "tensor"),
}

WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
        "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0, "send": lambda n: 1.0, "recv": lambda n: 0.0}
"""Kind ► bytes this rank sends per payload byte in a ring of n ranks (bandwidth-optimal
algorithms: an all-reduce is a reduce-scatter then an all-gather)."""


def nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(t) for t in x)
    return 0


class CommCounter:
    """(kind, group) ► [calls, payload bytes] since the last ``take``."""

    def __init__(self, dims=None) -> None:
        self.dims = dims
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._names: dict[tuple[int, ...], str] = {}
        self._local = threading.local()
        self._thread = threading.get_ident()
        self._originals: dict[tuple[Any, str], Any] = {}

    # ------------------------------------------------------------------ recording

    def record(self, kind: str, group, payload: int, peer: int | None = None) -> None:
        name = self.group_name(group) if peer is None else self.pair_name(group, peer)
        c = self.counts[(kind, name)]
        c[0] += 1
        c[1] += payload

    def take(self) -> dict[str, dict[str, int]]:
        """``{"<group>.<kind>": {"calls": n, "bytes": b}}`` since the last take, then reset."""
        out = {f"{g}.{k}": {"calls": c, "bytes": b} for (k, g), (c, b) in sorted(self.counts.items())}
        self.counts.clear()
        return out

    def group_name(self, group) -> str:
        ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        if ranks not in self._names:
            self._names[ranks] = self._name(ranks)
        return self._names[ranks]

    def pair_name(self, group, peer: int) -> str:
        """A point-to-point transfer: named by the axes this rank and its peer differ along."""
        if group is not None and group is not dist.group.WORLD:
            peer = dist.get_global_rank(group, peer)
        me = dist.get_rank()
        return self._names.setdefault((min(me, peer), max(me, peer), -1), self._name((me, peer)))

    def _name(self, ranks: tuple[int, ...]) -> str:
        if len(ranks) == dist.get_world_size() and len(ranks) > 1 and self.dims is None:
            return "world"
        if self.dims is None:
            return f"group{len(ranks)}"
        coords = [self.dims.coordinates(r) for r in ranks]
        varies = [name for i, name in enumerate(("pp", "dp", "cp", "tp")) if len({c[i] for c in coords}) > 1]
        if len(varies) > 1 and len(ranks) == self.dims.world_size and not set(varies) <= {"dp", "cp"}:
            return "world"
        return "+".join(varies) or "self"

    # ------------------------------------------------------------------ wrapping

    def install(self) -> CommCounter:
        """Wrap torch.distributed's functions (in both its namespaces) to record into this counter."""
        import torch.distributed.distributed_c10d as c10d

        for fname, (kind, param) in FUNCTIONS.items():
            for mod in (dist, c10d):
                orig = getattr(mod, fname, None)
                if orig is None or getattr(orig, "_comm_counted", False):
                    continue
                self._originals[(mod, fname)] = orig
                setattr(mod, fname, self._wrap(orig, kind, param))
        return self

    def uninstall(self) -> None:
        for (mod, fname), orig in self._originals.items():
            setattr(mod, fname, orig)
        self._originals.clear()

    def _wrap(self, fn, kind: str, param: str):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if getattr(self._local, "busy", False) or threading.get_ident() != self._thread:
                return fn(*args, **kwargs)
            self._local.busy = True
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
                peer = bound.get("dst", bound.get("src")) if kind in ("send", "recv") else None
                self.record(kind, bound.get("group"), nbytes(bound.get(param)), peer)
                return fn(*args, **kwargs)
            finally:
                self._local.busy = False

        counted._comm_counted = True  # type: ignore[attr-defined]
        return counted


_COUNTER: CommCounter | None = None


def install(dims=None) -> CommCounter:
    """The process's counter, installed once; called again with the run's ``ParallelDims`` to
    name groups by axis."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CommCounter(dims).install()
    else:
        _COUNTER.dims = dims
    return _COUNTER


def counter() -> CommCounter | None:
    return _COUNTER


def per_step(taken: dict[str, dict[str, int]], steps: int) -> dict[str, float]:
    """Flat metrics of ``take()``'s counts averaged over ``steps``: ``comm_bytes`` (all of this
    rank's payload per step) and ``comm_<group>_<kind>_bytes``."""
    out = {"comm_bytes": sum(v["bytes"] for v in taken.values()) / steps}
    for key, v in taken.items():
        out[f"comm_{key.replace('.', '_').replace('+', '_')}_bytes"] = v["bytes"] / steps
    return out
