"""Token loader: ``(x, y)`` batches of windows read from memory-mapped shards, DDP-sharded and resumable.

Notable choices:
- A split is cut into non-overlapping windows of ``seq_len + 1`` tokens sharing one token with the next
  (starts ``0, T, 2T, ...`` inside each shard; never across a shard boundary): ``x = w[:-1]``,
  ``y = w[1:]``. Every token is a target exactly once per epoch.
- Order: each epoch visits every window once in a permutation drawn from ``(seed, epoch)``; a global step
  takes the next ``batch_size * world_size`` windows and rank ``r`` gets the ``r``-th block of
  ``batch_size``, so ranks see disjoint windows and together see what one process with the global batch
  would. The tail of an epoch too short for a full global batch is skipped (it is in another position the
  next epoch).
- State is two integers, ``(epoch, cursor)``, cursor counting windows of the current epoch already
  consumed (by all ranks). ``state_dict`` / ``load_state_dict`` round-trip it, so a resumed loader yields
  exactly the batches the original would have; it also records the shard index's fingerprints and refuses a
  state from different data.
- ``iter_eval`` walks windows in order from the start, independent of the training position: every call
  yields the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanochat.data.shards import ShardIndex


class TokenLoader:
    """Infinite iterator of ``(x, y)`` int64 tensors of shape ``(batch_size, seq_len)``."""

    def __init__(
        self,
        shards: str | os.PathLike[str] | ShardIndex,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.index = shards if isinstance(shards, ShardIndex) else ShardIndex.load(Path(shards))
        self.split = split
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._data = self.index.open(split)
        # window table: (shard number, start offset) of every window of seq_len + 1 tokens
        counts = [max(0, (len(a) - 1) // seq_len) for a in self._data]
        self._win_shard = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self._win_start = np.concatenate(
            [np.arange(c, dtype=np.int64) * seq_len for c in counts] or [np.zeros(0, np.int64)]
        )
        self.num_windows = int(len(self._win_start))
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise ValueError(
                f"split {split!r} of {self.index.root} is too small for one batch: {self.index.num_tokens(split):,} tokens "
                f"in {len(self._data)} shard(s) make {self.num_windows} windows of {seq_len}+1 tokens, but one step "
                f"needs batch_size*world_size = {self.global_batch}; use a smaller batch/sequence or more data"
            )
        self.epoch = 0
        self.cursor = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    @property
    def tokens_per_step(self) -> int:
        """Target tokens per step over all ranks."""
        return self.global_batch * self.seq_len

    # ------------------------------------------------------------------ order and reading
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def _read(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)  # (B, T+1)
        for row, w in enumerate(windows):
            start = self._win_start[w]
            buf[row] = self._data[self._win_shard[w]][start : start + T + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.global_batch > self.num_windows:
            self.epoch += 1
            self.cursor = 0
        order = self._epoch_order(self.epoch)
        lo = self.cursor + self.rank * self.batch_size
        batch = order[lo : lo + self.batch_size]
        self.cursor += self.global_batch
        return self._read(batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def iter_eval(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in window order from the start (this rank's share), at most ``max_batches``.

        Every rank yields the same number of batches; the tail shorter than a global batch is left out.
        Does not move the training position.
        """
        n = self.steps_per_epoch if max_batches is None else min(max_batches, self.steps_per_epoch)
        for k in range(n):
            lo = k * self.global_batch + self.rank * self.batch_size
            yield self._read(np.arange(lo, lo + self.batch_size, dtype=np.int64))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "split": self.split,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "corpus_fingerprint": self.index.corpus_fingerprint,
            "tokenizer_hash": self.index.tokenizer_hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The data, split, seq_len, seed and shuffle must match; batch size and world
        size may change (the cursor counts windows, so no window is repeated or skipped mid-epoch)."""
        mine = self.state_dict()
        for key in ("split", "seq_len", "num_windows", "seed", "shuffle", "corpus_fingerprint", "tokenizer_hash"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not match this loader: {key} {state.get(key)!r} != {mine[key]!r}")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
