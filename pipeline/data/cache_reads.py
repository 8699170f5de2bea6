"""What one process's reads found in the node's shard cache: shard reads and cache hits.

    reads = CacheReads()          # one per ShardCache handle
    reads.fetched(i)              # this process fetched shard i (a prefetch, or for a read)
    reads.read(shard_ids)         # after a batch's samples were read from these shards
    reads.take()                  # {"shard_reads": 40, "cache_hits": 40}, and a new period

A shard read is counted once per period (the time between two ``take`` calls; the training loop
takes the counters once per epoch record): the first time this process reads a sample of it.
It is a hit when the shard was in the node's cache without this process fetching it for this
read: cached by an earlier epoch, by a worker that ran before on the node, or by another rank
of the node. A shard this process fetched (ahead, or when the read needed it) is a miss at its
next read, whichever period that falls in.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class CacheReads:
    """Thread-safe counters of shard reads and hits (the fetch threads mark fetches)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shard_reads = self.cache_hits = 0  # since the handle was opened
        self._counted: set[int] = set()  # read in this period
        self._fetched: set[int] = set()  # fetched by this process and not read since

    def fetched(self, shard: int) -> None:
        with self._lock:
            self._fetched.add(shard)

    def read(self, shards: Iterable[int]) -> None:
        """Count the shards of a batch just read; a set lookup per sample when none is new."""
        if self._counted.issuperset(shards):
            return
        with self._lock:
            for i in set(shards) - self._counted:
                self._counted.add(i)
                self.shard_reads += 1
                if i in self._fetched:
                    self._fetched.discard(i)
                else:
                    self.cache_hits += 1

    def take(self) -> dict[str, int]:
        """The counts since the handle was opened; each shard may count again from now on."""
        with self._lock:
            self._counted = set()
            return {"shard_reads": self.shard_reads, "cache_hits": self.cache_hits}
