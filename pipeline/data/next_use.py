"""When each shard is read next: what a bounded shard cache evicts by (Belady's policy).

    plan = ReadPlan(manifest, order, global_batch=256)   # order(epoch) -> the epoch's sample ids
    plan.at(epoch, step)                                 # where this process reads now
    plan.next_use([3, 17, 40])                           # sample positions of their next reads
    plan.protected()                                     # shards the current windows still read
    plan.upcoming()                                      # shards by next read: what to prefetch

The training order is a pure function of (seed, epoch, step, position) (``shard_reads.epoch_order``),
so the cache knows the future: the shard read furthest ahead is the best to drop (Belady's
optimal policy; an LRU cache, which only knows the past, drops shards that are read again
soon). Positions count samples of the global batch order over epochs (``epoch x N + position``):
every rank of the node reads a slice of each global batch, and a window's shards are spread
over all of its batches, so the node's next read of a shard is where the global order next
reaches it, within a batch or two.

A shard's samples lie in one window of ``data.shuffle_window`` shards per epoch, so its reads
in an epoch span its window's positions. ``protected`` is every shard with reads left in the
windows the current global batch touches: those are never evicted. With ``shuffle_window=0``
(a full shuffle) that is the whole training split, and a cache smaller than it cannot work.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.data.shard_manifest import Manifest

NEVER = np.iinfo(np.int64).max  # the next use of a shard the plan does not read (a val shard)


class _Epoch:
    """One epoch's first and last read of each shard, and the span of the window it lies in."""

    def __init__(self, shard_of_position: np.ndarray, num_shards: int):
        n = len(shard_of_position)
        positions = np.arange(n, dtype=np.int64)
        self.first = np.full(num_shards, NEVER, np.int64)
        self.last = np.full(num_shards, -1, np.int64)
        np.minimum.at(self.first, shard_of_position, positions)
        np.maximum.at(self.last, shard_of_position, positions)
        # Windows are disjoint runs of positions; merging the shards' [first, last] spans finds them.
        read = np.flatnonzero(self.last >= 0)
        by_first = read[np.argsort(self.first[read], kind="stable")]
        self.window_start = np.full(num_shards, NEVER, np.int64)
        self.window_end = np.full(num_shards, -1, np.int64)
        members: list[int] = []
        end = -1
        for s in by_first.tolist() + [None]:
            if members and (s is None or self.first[s] > end):
                self.window_start[members] = self.first[members[0]]
                self.window_end[members] = end
                members = []
            if s is not None:
                members.append(s)
                end = max(end, int(self.last[s]))


class ReadPlan:
    """The order in which this process reads training shards, and where it is now.

    Args:
        manifest: the dataset.
        order: ``order(epoch)`` -> the epoch's training sample ids in order (``epoch_order``).
        global_batch: samples per step over all ranks.
    """

    def __init__(self, manifest: Manifest, order: Callable[[int], np.ndarray], global_batch: int):
        self.manifest, self.order, self.global_batch = manifest, order, global_batch
        self.shard_of_sample = manifest.split("train").shard
        self.size = len(self.shard_of_sample)
        self.steps = self.size // global_batch
        self._epochs: dict[int, _Epoch] = {}
        self.epoch, self.position = 0, 0

    def _of(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            ids = self.order(epoch)[: self.steps * self.global_batch]  # the batches actually read
            self._epochs[epoch] = _Epoch(self.shard_of_sample[ids], len(self.manifest.shards))
        return self._epochs[epoch]

    def at(self, epoch: int, step: int) -> None:
        """This process now reads the global batch ``step`` of ``epoch``."""
        self.epoch, self.position = epoch, step * self.global_batch

    def now(self) -> int:
        return self.epoch * self.size + self.position

    def next_use(self, shards: list[int]) -> np.ndarray:
        """The position of each shard's next read from now (``NEVER``: not within two epochs)."""
        ids = np.asarray(shards, np.int64)
        this, following = self._of(self.epoch), self._of(self.epoch + 1)
        base = self.epoch * self.size
        later = np.where(following.last[ids] >= 0, base + self.size + following.first[ids], NEVER)
        return np.where(
            this.last[ids] >= self.position, base + np.maximum(this.first[ids], self.position), later
        )

    def protected(self) -> set[int]:
        """Shards with reads left in the windows of the current global batch: never evicted."""
        e = self._of(self.epoch)
        start, stop = self.position, self.position + self.global_batch - 1
        touched = (e.window_start <= stop) & (e.window_end >= start) & (e.last >= start)
        return set(np.flatnonzero(touched).tolist())

    def upcoming(self) -> list[int]:
        """Training shards not yet read from now, by next read: this epoch's, then the next one's."""
        this, following = self._of(self.epoch), self._of(self.epoch + 1)
        now = np.flatnonzero(this.last >= self.position)
        now = now[np.argsort(np.maximum(this.first[now], self.position), kind="stable")]
        nxt = np.flatnonzero(following.last >= 0)
        nxt = nxt[np.argsort(following.first[nxt], kind="stable")]
        seen = set(now.tolist())
        return now.tolist() + [int(s) for s in nxt if int(s) not in seen]


def window_bytes_bound(manifest: Manifest, window: int, global_batch: int | None) -> int:
    """The most bytes of training shards that the windows of one global batch can hold.

    A batch of ``global_batch`` samples touches at most ``1 + ceil((global_batch - 1) /
    fewest samples in a window)`` windows (None: two, as for ImageNet's 18,000-image windows),
    each of ``window`` shards (the whole split for a full shuffle); the bound takes the largest
    shards. Exact enough for ImageNet's equal shards.
    """
    sizes = sorted((manifest.shards[i].size for i in manifest.shard_ids("train")), reverse=True)
    counts = sorted(manifest.shards[i].samples for i in manifest.shard_ids("train"))
    if window <= 0 or window >= len(sizes):
        return sum(sizes)
    fewest = max(1, sum(counts[:window]))
    windows = 2 if global_batch is None else 1 + -(-(global_batch - 1) // fewest)
    return sum(sizes[: windows * window])
