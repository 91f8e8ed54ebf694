"""Overlap data loading with compute: a background thread reads the next micro-batches.

Batches are a pure function of (step, micro, rank), so the thread can run ahead without any
state; it stops at the end of training. On CUDA, batches are pinned so the host-to-device
copy can be asynchronous (``non_blocking=True`` in the loop).
"""

from __future__ import annotations

import queue
import threading

import torch


class Prefetcher:
    def __init__(self, batches, rank: int, accum: int, start_step: int, steps: int, depth: int = 4,
                 index_of=lambda step: step) -> None:
        """Reads loop steps ``start_step`` to ``steps``; ``index_of`` maps a loop step to the data
        step whose batches it trains on (skipped data steps)."""
        self.batches, self.rank, self.accum, self.index_of = batches, rank, accum, index_of
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.pin = torch.cuda.is_available()
        self.next_key = (start_step, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start_step, steps), daemon=True)
        self.thread.start()

    def _run(self, start: int, steps: int) -> None:
        for step in range(start, steps):
            for micro in range(self.accum):
                batch = self.batches.micro_batch(self.index_of(step), micro, self.rank)
                if self.pin:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                while not self.stop.is_set():
                    try:
                        self.q.put(((step, micro), batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return

    def micro_batch(self, step: int, micro: int, rank: int):
        key, batch = self.q.get()
        if key != (step, micro):  # the loop and the thread disagree: a bug, not a data problem
            raise RuntimeError(f"prefetcher out of order: expected {(step, micro)}, got {key}")
        return batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)  # no reader thread may outlive training into interpreter exit
