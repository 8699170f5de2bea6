"""When each shard is read next: what a bounded shard cache evicts by (Belady's policy).

    plan = ReadPlan(manifest, order, global_batch=256, node_ranks=[2, 3], world_size=4)
    plan.at(epoch, step)                                 # where this process reads now
    plan.next_use([3, 17, 40])                           # sample positions of their next reads
    plan.protected()                                     # shards the current windows still read
    plan.upcoming()                                      # shards by this node's next read: what to prefetch

The training order is a pure function of (seed, epoch, step, position) (``shard_reads.epoch_order``),
so the cache knows the future: the shard read furthest ahead is the best to drop (Belady's
optimal policy; an LRU cache, which only knows the past, drops shards that are read again
soon). Positions count samples of the global batch order over epochs (``epoch x N + position``);
each rank reads its contiguous slice of every global batch (``rank_split.rank_slice``), so the
node's ranks (``node_ranks``, sharing the node's cache) read the positions of their slices only.
A shard's next use is the next position one of them reads in it, and prefetching follows that
order, window by window: a node fetches first what its own ranks read first, not what the
global order reaches first (within a window the two differ by a batch or two; for a shard only
other nodes read in an epoch, by that whole epoch).

A shard's samples lie in one window of ``data.shuffle_window`` shards per epoch, so its reads
in an epoch span its window's positions. ``protected`` is every shard with reads left (by the
node's ranks) in the windows the current global batch touches: those are never evicted. With ``shuffle_window=0``
(a full shuffle) that is the whole training split, and a cache smaller than it cannot work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeline.data.rank_split import rank_slice
from pipeline.data.shard_manifest import Manifest

NEVER = np.iinfo(np.int64).max  # the next use of a shard the plan does not read (a val shard)


def _spans(
    shard_of_position: np.ndarray, positions: np.ndarray, num_shards: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each shard's first and last position among ``positions`` (NEVER and -1: not read there)."""
    first = np.full(num_shards, NEVER, np.int64)
    last = np.full(num_shards, -1, np.int64)
    np.minimum.at(first, shard_of_position[positions], positions)
    np.maximum.at(last, shard_of_position[positions], positions)
    return first, last


class _Epoch:
    """One epoch's first and last read of each shard by the node's ranks (``node_columns``: the
    positions of a global batch they read; None: all), and the span of the window it lies in."""

    def __init__(self, shard_of_position: np.ndarray, num_shards: int, node_columns: np.ndarray | None):
        positions = np.arange(len(shard_of_position), dtype=np.int64)
        first, last = _spans(shard_of_position, positions, num_shards)
        if node_columns is None:
            self.first, self.last = first, last
        else:
            mine = positions[node_columns[positions % len(node_columns)]]
            self.first, self.last = _spans(shard_of_position, mine, num_shards)
        # Windows are disjoint runs of positions; merging the shards' [first, last] spans over
        # every rank's reads finds them.
        read = np.flatnonzero(last >= 0)
        by_first = read[np.argsort(first[read], kind="stable")]
        self.window_start = np.full(num_shards, NEVER, np.int64)
        self.window_end = np.full(num_shards, -1, np.int64)
        members: list[int] = []
        end = -1
        for s in by_first.tolist() + [None]:
            if members and (s is None or first[s] > end):
                self.window_start[members] = first[members[0]]
                self.window_end[members] = end
                members = []
            if s is not None:
                members.append(s)
                end = max(end, int(last[s]))


def node_columns(global_batch: int, node_ranks: Sequence[int], world_size: int) -> np.ndarray:
    """Which positions of a global batch the node's ranks read (bool, one per position)."""
    columns = np.zeros(global_batch, bool)
    for rank in node_ranks:
        columns[rank_slice(global_batch, rank, world_size)] = True
    return columns


class ReadPlan:
    """The order in which this node's ranks read training shards, and where this process is now.

    Args:
        manifest: the dataset.
        order: ``order(epoch)`` -> the epoch's training sample ids in order (``epoch_order``).
        global_batch: samples per step over all ranks.
        node_ranks: the ranks that share this node's cache; None: every rank (one node).
        world_size: the number of ranks (with ``node_ranks``).
    """

    def __init__(self, manifest: Manifest, order: Callable[[int], np.ndarray], global_batch: int,
                 node_ranks: Sequence[int] | None = None, world_size: int = 1):  # fmt: skip
        self.manifest, self.order, self.global_batch = manifest, order, global_batch
        self.columns = None if node_ranks is None else node_columns(global_batch, node_ranks, world_size)
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
            self._epochs[epoch] = _Epoch(self.shard_of_sample[ids], len(self.manifest.shards), self.columns)
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
        """Training shards the node's ranks have yet to read, by their next read: this epoch's,
        then the next one's."""
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
