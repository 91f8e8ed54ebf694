"""Fixed-length windows over a packed token stream, and the deterministic batch schedule.

The schedule is a pure function of (seed, samples consumed): a global sample index g lives in
epoch ``g // n_windows`` and maps through that epoch's seeded permutation. Optimizer step s
consumes global samples ``[s * G, (s + 1) * G)`` (G = global batch); micro-step m of data-parallel
rank r reads the slice ``(m * dp + r) * micro`` of it. Every layout with the same G therefore
trains on the same sequences per step, and resume needs only the step number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class WindowDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted labels)."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int) -> None:
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_windows

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        starts = indices.astype(np.int64) * self.seq_len
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


class BatchSchedule:
    """Which windows each (step, micro-step, dp rank) reads; shuffled per epoch, resumable."""

    def __init__(
        self, n_windows: int, micro_batch: int, grad_accum: int, dp: int, seed: int, shuffle: bool = True
    ) -> None:
        if n_windows < 1:
            raise ValueError("no windows")
        self.n = n_windows
        self.micro, self.accum, self.dp = micro_batch, grad_accum, dp
        self.global_batch = micro_batch * grad_accum * dp
        self.seed, self.shuffle = seed, shuffle
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).numpy()
            else:
                self._perm = np.arange(self.n)
            self._perm_epoch = epoch
        return self._perm

    def windows(self, first_sample: int, count: int) -> np.ndarray:
        """Window indices of global samples ``first_sample ... first_sample + count - 1``."""
        g = np.arange(first_sample, first_sample + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.n):
            sel = g // self.n == epoch
            out[sel] = self._permutation(int(epoch))[g[sel] % self.n]
        return out

    def micro_batch(self, step: int, micro: int, rank: int) -> np.ndarray:
        first = step * self.global_batch + (micro * self.dp + rank) * self.micro
        return self.windows(first, self.micro)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n
