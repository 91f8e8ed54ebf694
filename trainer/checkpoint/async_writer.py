"""Asynchronous checkpoint saves (``checkpoint.async``): snapshot on the training path, write
behind it.

Every file DeepSpeed writes goes through its engine's ``checkpoint_engine.save(state, path)``.
While a save is captured, ours replaces that call with a snapshot: each tensor storage is copied
once into host memory (pinned, by non-blocking copies on the training stream, on GPU; a
``clone`` on CPU), sharing between tensors kept, so the file later written is what ``torch.save``
would have written at that moment. Training then goes on while one background thread per
process serialises the snapshot into the staging directory (``torch.save`` releases the GIL
while it writes; measured: no pause of the training thread above 10 ms). A writer *process*
was tried: forked, its copy-on-write faults cost the next step more than the snapshot's copy. When every rank has written its
files (agreed over a gloo group of the writers' own, so the training's collectives never
interleave with theirs), rank 0's writer publishes the checkpoint exactly as a synchronous save
does: manifest, rename, ``latest``, pruning. Until then the previous checkpoint stays ``latest``.

The training thread waits for a save in flight before the next one and at the end
(``checkpoint.wait``), where any rank's failure becomes the same ``SaveFailed`` on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from trainer import distributed
from trainer.checkpoint.format import without_zip_crc

Write = tuple[Any, Path]
"""A snapshotted object and the file it goes to."""

_stall_s = 0.0  # fault injection (``slowsave@S``): the next write waits this long first


def stall_next_write(seconds: float) -> None:
    global _stall_s
    _stall_s = seconds


def snapshot(obj: Any, memo: dict | None = None) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) that later training cannot change;
    tensors sharing a storage still share one afterwards."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        return _tensor(obj, memo)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps OrderedDict and friends
        for k, v in obj.items():
            out[k] = snapshot(v, memo)
        return out
    if isinstance(obj, list | tuple):
        items = [snapshot(v, memo) for v in obj]
        return items if isinstance(obj, list) else type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)  # numbers, strings, numpy RNG states, DeepSpeed's small records


def _tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    t = t.detach()
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return t.cpu().clone()
    key = (storage.device, storage.data_ptr())
    host = memo.get(key)
    if host is None:
        if storage.device.type == "cpu":
            host = storage.clone()
        else:  # ordered after the step that produced the values, before any later update
            host = torch.UntypedStorage(storage.nbytes(), device="cpu").pin_memory()
            host.copy_(storage, non_blocking=True)
        memo[key] = host
    return torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())


class _Snapshotting:
    """Stands in for DeepSpeed's checkpoint engine during a captured save: ``save`` snapshots
    and queues; everything else (directories, commit) is the real engine's."""

    def __init__(self, inner, writes: list[Write], memo: dict) -> None:
        self._inner, self._writes, self._memo = inner, writes, memo

    def save(self, state_dict: Any, path: str) -> None:
        self._writes.append((snapshot(state_dict, self._memo), Path(path)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Pending(NamedTuple):
    thread: threading.Thread
    outcome: list[tuple[Exception | None, float]]
    ckpt_root: Path
    tag: str


class AsyncSaver:
    """The background writer of one process. Create it on every rank at the same point (its
    gloo group is made by a collective)."""

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo") if distributed.world_size() > 1 else None
        self.pending: Pending | None = None

    snapshot = staticmethod(snapshot)

    @contextlib.contextmanager
    def capture(self, engine) -> Iterator[list[Write]]:
        """Within: DeepSpeed's saves on ``engine`` are snapshotted into the yielded list."""
        writes: list[Write] = []
        real = engine.checkpoint_engine
        engine.checkpoint_engine = _Snapshotting(real, writes, {})
        try:
            yield writes
        finally:
            engine.checkpoint_engine = real

    def submit(self, writes: list[Write], publish: Callable[[], None], ckpt_root: Path, tag: str) -> None:
        done = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            done = torch.cuda.Event()
            done.record()  # the snapshot's device-to-host copies
        outcome: list[Exception | None] = []
        # A daemon thread: a process that dies (an exception, a signal) does not wait for it,
        # and a half-written staging directory is never published.
        thread = threading.Thread(target=lambda: outcome.append(self._write(writes, publish, done)),
                                  name="checkpoint-writer", daemon=True)
        thread.start()
        self.pending = Pending(thread, outcome, ckpt_root, tag)

    def _write(self, writes: list[Write], publish: Callable[[], None], done) -> tuple[Exception | None, float]:
        global _stall_s
        error, t0 = None, time.perf_counter()
        with contextlib.suppress(OSError):  # Linux: a thread's own nice value
            # Lowest priority: where training keeps every core busy (CPU training), the writer
            # takes the gaps rather than slowing the steps; on GPU hosts the CPU is mostly idle.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            time.sleep(_stall_s)
            _stall_s = 0.0
            if done is not None:
                done.synchronize()
            with without_zip_crc():
                for obj, path in writes:
                    torch.save(obj, path)
        except BaseException as e:  # OSError, torch's "file write failed" on a full disk
            error = e if isinstance(e, Exception) else RuntimeError(repr(e))
        # Every rank's files are on disk before rank 0 publishes them.
        flag = torch.tensor([float(error is not None)])
        if self._group is not None:
            dist.all_reduce(flag, group=self._group)
        if error is None and flag.item():
            error = RuntimeError("on another rank")
        if error is None and distributed.rank() == 0:
            try:
                publish()
            except Exception as e:
                error = e
        return error, time.perf_counter() - t0

    def wait(self) -> tuple[Exception | None, float, Pending] | None:
        """Block until the save in flight (if any) is written and published: (its error, the
        seconds it took behind training, what it was)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.thread.join()
        if not pending.outcome:
            return RuntimeError("the checkpoint writer thread died"), 0.0, pending
        return (*pending.outcome[0], pending)
