"""Asynchronous checkpoint saves (``checkpoint.async``): snapshot on the training path, write
behind it.

Every file DeepSpeed writes goes through its engine's ``checkpoint_engine.save(state, path)``.
While a save is captured, ours replaces that call with a snapshot: each tensor storage is copied
once into host memory, sharing between tensors kept, so the file later written is what
``torch.save`` would have written at that moment. The host buffers are kept from save to save
(``HostBuffers``: the same storages come round every time), so only the first save allocates;
on GPU they are pinned, and the device-to-host copies run on a side stream of their own that
first waits for the training stream (the values of the finished step); the next step's
forward and backward only read what is being copied, and the train module fences its update
behind the copies (``AsyncSaver.fence``, before the optimizer step). Training goes on at once
while one background thread per
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


class HostBuffers:
    """Host memory for snapshots, kept from one save to the next: a save takes buffers, and
    they come back (``release``) once its writer is done. Allocating and pinning gigabytes is
    the slow part of a snapshot on GPU; after the first save, none is allocated."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}
        self._taken: list[tuple[tuple[int, bool], torch.UntypedStorage]] = []

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        free = self._free.get((nbytes, pinned))
        buf = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self._taken.append(((nbytes, pinned), buf))
        return buf

    def release(self) -> None:
        """Every buffer taken since the last release is free again (its save is written)."""
        for key, buf in self._taken:
            self._free.setdefault(key, []).append(buf)
        self._taken = []


class _Copier:
    """How one capture copies storages: into ``buffers`` (fresh ones without), device storages
    on ``stream`` (None: the current stream)."""

    def __init__(self, buffers: HostBuffers | None = None, stream=None) -> None:
        self.buffers, self.stream, self.memo = buffers or HostBuffers(), stream, {}

    def host(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        on_device = storage.device.type != "cpu"
        host = self.buffers.take(storage.nbytes(), pinned=on_device)
        if not on_device:
            host.copy_(storage)
            return host
        with contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream):
            host.copy_(storage, non_blocking=True)
            if self.stream is not None:  # the allocator may not hand a dropped source to
                # the training stream before the copy has read it
                torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).record_stream(self.stream)
        return host


def snapshot(obj: Any, copier: _Copier | None = None) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) that later training cannot change;
    tensors sharing a storage still share one afterwards."""
    copier = _Copier() if copier is None else copier
    if torch.is_tensor(obj):
        return _tensor(obj, copier)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps OrderedDict and friends
        for k, v in obj.items():
            out[k] = snapshot(v, copier)
        return out
    if isinstance(obj, list | tuple):
        items = [snapshot(v, copier) for v in obj]
        return items if isinstance(obj, list) else type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)  # numbers, strings, numpy RNG states, DeepSpeed's small records


def _tensor(t: torch.Tensor, copier: _Copier) -> torch.Tensor:
    t = t.detach()
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return t.cpu().clone()
    key = (storage.device, storage.data_ptr())
    host = copier.memo.get(key)
    if host is None:
        host = copier.memo[key] = copier.host(storage)
    return torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())


class _Snapshotting:
    """Stands in for DeepSpeed's checkpoint engine during a captured save: ``save`` snapshots
    and queues; everything else (directories, commit) is the real engine's."""

    def __init__(self, inner, writes: list[Write], copier: _Copier) -> None:
        self._inner, self._writes, self._copier = inner, writes, copier

    def save(self, state_dict: Any, path: str) -> None:
        self._writes.append((snapshot(state_dict, self._copier), Path(path)))

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
        self.buffers = HostBuffers()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._stream = torch.cuda.Stream() if cuda else None
        self._copier: _Copier | None = None  # the capture in progress (snapshot and rank state)
        self._copied = None  # the side stream's event of the last save, until the fence

    @contextlib.contextmanager
    def capture(self, engine) -> Iterator[list[Write]]:
        """Within: DeepSpeed's saves on ``engine`` are snapshotted into the yielded list."""
        if self.pending is None:  # no save in flight: every buffer is free (a failed one's too)
            self.buffers.release()
        if self._stream is not None:  # copy the values the training stream has computed
            self._stream.wait_stream(torch.cuda.current_stream())
        self._copier = _Copier(self.buffers, self._stream)
        writes: list[Write] = []
        real = engine.checkpoint_engine
        engine.checkpoint_engine = _Snapshotting(real, writes, self._copier)
        try:
            yield writes
        finally:
            engine.checkpoint_engine = real

    def snapshot(self, obj: Any) -> Any:
        """``obj`` snapshotted as part of the capture in progress (its buffers, its stream)."""
        return snapshot(obj, self._copier)

    def fence(self) -> None:
        """Before the next update of anything snapshotted: the training stream waits for the
        last save's copies (device-side; the host goes on)."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def submit(self, writes: list[Write], publish: Callable[[], None], ckpt_root: Path, tag: str) -> None:
        done = None
        if self._stream is not None:
            done = torch.cuda.Event()
            done.record(self._stream)  # the snapshot's device-to-host copies
            self._copied = done
        self._copier = None
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
        self.buffers.release()  # written: the next save copies into the same memory
        if not pending.outcome:
            return RuntimeError("the checkpoint writer thread died"), 0.0, pending
        return (*pending.outcome[0], pending)
