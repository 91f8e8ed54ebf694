"""Fixed-length windows over a packed token stream, and the deterministic batch schedule.

The schedule is a pure function of (seed, samples consumed): a global sample index g lives in
epoch ``g // n_windows`` and maps through that epoch's seeded permutation: a table of every
window up to ``TABLE_MAX`` windows (128 MiB of int64), beyond it a bijection computed per index
(``IndexPermutation``) that holds no table. Optimizer step s
consumes global samples ``[s * G, (s + 1) * G)`` (G = global batch); micro-step m of data-parallel
rank r reads the slice ``(m * dp + r) * micro`` of it. Every layout with the same G therefore
trains on the same sequences per step, and resume needs only the step number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.rnn import detach_state


class WindowDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted labels)."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int) -> None:
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_windows

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Windows by index (window i starts at token ``i * seq_len``)."""
        return self.batch_at(indices.astype(np.int64) * self.seq_len)

    def batch_at(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """Windows starting at these token positions."""
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}


class IndexPermutation:
    """A seeded bijection of ``[0, n)`` that holds no table: a six-round Feistel network on
    the smallest domain of 4^h indices that holds ``n``, with cycle-walking (an index that lands
    at or past ``n`` goes through the network again until it lands below: its orbit stays in
    the domain, so it ends, and the map restricted to ``[0, n)`` is a bijection of it). Memory
    is O(1) whatever ``n`` (a table of a 1 T-token corpus's windows at sequence 2048 would be
    4 GB of int64 per rank); an index takes under 4 passes on average (the domain is < 4n)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int | list[int]) -> None:
        self.n = n
        self.half = (max(2, (n - 1).bit_length()) + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        """splitmix64's finaliser of ``right + key`` (uint64 arithmetic wraps), cut to a half."""
        x = right + key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self.mask

    def _network(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << h) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = self._network(np.asarray(i, dtype=np.uint64))
        out = x >= self.n
        while out.any():
            x[out] = self._network(x[out])
            out = x >= self.n
        return x.astype(np.int64)


TABLE_MAX = 1 << 24
"""Windows up to which an epoch's order is a ``torch.randperm`` table (at most 128 MiB per rank;
the order every run of such a corpus has always had, so their checkpoints resume as before);
past it, ``IndexPermutation``."""


class BatchSchedule:
    """Which windows each (step, micro-step, dp rank) reads; shuffled per epoch, resumable."""

    def __init__(
        self, n_windows: int, micro_batch: int, grad_accum: int, dp: int, seed: int, shuffle: bool = True,
        table_max: int = TABLE_MAX,
    ) -> None:
        if n_windows < 1:
            raise ValueError("no windows")
        self.n = n_windows
        self.micro, self.accum, self.dp = micro_batch, grad_accum, dp
        self.global_batch = micro_batch * grad_accum * dp
        self.seed, self.shuffle, self.table_max = seed, shuffle, table_max
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _order(self, epoch: int):
        """Epoch ``epoch``'s map from position to window: a table, or past ``table_max`` windows
        the bijection."""
        if self.n > self.table_max:
            return IndexPermutation(self.n, [self.seed, epoch])
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return self._perm.__getitem__

    def windows(self, first_sample: int, count: int) -> np.ndarray:
        """Window indices of global samples ``first_sample ... first_sample + count - 1``."""
        g = np.arange(first_sample, first_sample + count)
        if not self.shuffle:
            return g % self.n
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.n):
            sel = g // self.n == epoch
            out[sel] = self._order(int(epoch))(g[sel] % self.n)
        return out

    def micro_batch(self, step: int, micro: int, rank: int) -> np.ndarray:
        first = step * self.global_batch + (micro * self.dp + rank) * self.micro
        return self.windows(first, self.micro)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


class RandomStarts:
    """Windows that start at any token, drawn with replacement (``data.sampling=random``, as
    nanoGPT samples): a window's context then differs each time its text comes round. Step s's
    starts come from a generator seeded by (seed, s) alone: every layout with the same global
    batch reads the same sequences, and resume needs only the step number."""

    def __init__(self, n_tokens: int, seq_len: int, micro_batch: int, grad_accum: int, dp: int, seed: int) -> None:
        self.n_starts = n_tokens - seq_len  # the last window still has seq_len + 1 tokens
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self.micro, self.dp = micro_batch, dp
        self.global_batch = micro_batch * grad_accum * dp

    def micro_batch(self, step: int, micro: int, rank: int) -> np.ndarray:
        """Token positions where the windows of (step, micro-step, rank) start."""
        starts = np.random.default_rng([self.seed, step]).integers(0, self.n_starts, self.global_batch)
        first = (micro * self.dp + rank) * self.micro
        return starts[first : first + self.micro]

    def epoch_of(self, step: int) -> float:
        """Passes over the tokens, counted in tokens read."""
        return step * self.global_batch * self.seq_len / self.n_tokens


def mark_documents(batch: dict[str, torch.Tensor], eos: int | None) -> dict[str, torch.Tensor]:
    """With ``eos`` (``data.document_mask``): which document each input token belongs to (an
    end-of-text token to the document it ends), and no target across a document boundary: what
    an end-of-text token is followed by, the next document's first token, is not predicted (nor
    is it when documents are run one by one)."""
    if eos is None:
        return batch
    ends = batch["input_ids"] == eos
    batch["document_ids"] = torch.cumsum(ends, dim=1) - ends.long()
    batch["labels"] = batch["labels"].masked_fill(ends, -100)
    return batch


class LMBatches:
    """Language-model micro-batches: shuffled windows (``BatchSchedule``) or windows at random
    starts (``RandomStarts``) for training, a fixed unshuffled slice for evaluation."""

    def __init__(self, data: WindowDataset, micro: int, accum: int, dp: int, seed: int,
                 sampling: str = "windows", document_eos: int | None = None) -> None:
        self.data, self.micro = data, micro
        self.document_eos = document_eos
        """``data.document_mask``: the end-of-text id that closes each packed document."""
        self.random = sampling == "random"
        self.schedule = (RandomStarts(len(data.tokens), data.seq_len, micro, accum, dp, seed) if self.random
                         else BatchSchedule(len(data), micro, accum, dp, seed))

    def micro_batch(self, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        picked = self.schedule.micro_batch(step, micro, rank)
        return self._documents(self.data.batch_at(picked) if self.random else self.data.batch(picked))

    def _documents(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return mark_documents(batch, self.document_eos)

    @property
    def eval_capacity(self) -> int:
        """Evaluation batches before a window would be read a second time."""
        return len(self.data) // self.micro

    def eval_batches(self, rank: int, dp: int, n: int):
        for b in range(n):
            first = (b * dp + rank) * self.micro
            yield self._documents(self.data.batch(np.arange(first, first + self.micro) % len(self.data)))

    def epoch_of(self, step: int) -> float:
        return self.schedule.epoch_of(step)


class StreamBatches:
    """Truncated BPTT: every batch row reads one contiguous stream, window after window.

    The train tokens are cut into ``micro × accum × dp`` equal streams (one per global row);
    step ``s`` reads window ``s mod W`` of every stream. Micro-step ``m`` of rank ``r`` owns the
    same rows at every step, so the recurrent state it returns is carried into its next
    window (detached: gradients stop at the window edge) and reset when an epoch starts over.
    Evaluation reads the validation stream the same way, carrying state across its windows.
    """

    def __init__(self, train: WindowDataset, val: WindowDataset, micro: int, accum: int, dp: int) -> None:
        self.train, self.val = train, val
        self.micro, self.dp, self.rows = micro, dp, micro * accum * dp
        self.seq_len = train.seq_len
        self.stream_len = len(train.tokens) // self.rows
        self.windows = (self.stream_len - 1) // self.seq_len
        if self.windows < 1:
            raise ValueError("train split too short for one window per stream")
        self.states: dict[int, object] = {}
        self._eval_state: object = None

    @staticmethod
    def _read(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
        rows = np.stack([tokens[s: s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def micro_batch(self, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        w = step % self.windows
        if w == 0:
            self.states.pop(micro, None)  # a new pass over the streams starts from zero state
        first_row = (micro * self.dp + rank) * self.micro
        starts = (np.arange(first_row, first_row + self.micro) * self.stream_len) + w * self.seq_len
        batch = self._read(self.train.tokens, starts, self.seq_len)
        batch["state"] = self.states.get(micro)
        return batch

    def after_forward(self, micro: int, out) -> None:
        self.states[micro] = detach_state(out[1])

    def eval_batches(self, rank: int, dp: int, n: int):
        val_rows = self.micro * dp
        stream = len(self.val.tokens) // val_rows
        windows = max(1, (stream - 1) // self.seq_len)
        first_row = rank * self.micro
        self._eval_state = None
        for b in range(n):
            w = b % windows
            if w == 0:
                self._eval_state = None
            starts = np.arange(first_row, first_row + self.micro) * stream + w * self.seq_len
            batch = self._read(self.val.tokens, starts, self.seq_len)
            batch["state"] = self._eval_state
            yield batch

    def after_eval_forward(self, out) -> None:
        self._eval_state = detach_state(out[1])

    def epoch_of(self, step: int) -> float:
        return step / self.windows

    def state_dict(self) -> dict:
        """This rank's carried states (saved per rank with each checkpoint)."""
        return {"states": self.states}

    def load_state_dict(self, state: dict) -> None:
        self.states = state["states"]
