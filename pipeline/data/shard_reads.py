"""The sharded layout's epoch order and its byte reader, apart from the loaders (no torch, no DALI:
``bench feed``'s node processes start in a fraction of a second).

    order = epoch_order(manifest, seed, epoch, window)       # the training sample ids of the epoch
    reader = ShardReader(manifest, cache, "train", lambda e: epoch_order(manifest, seed, e, window), 256,
                         node_ranks=[2, 3], world_size=4)   # the ranks that share this node's cache
    jpegs = reader(order[:256], epoch, 0)                    # encoded images, the cache prefetching ahead

How the order is drawn and why is said in ``pipeline.data.shard_feed``, which builds the loaders
over these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.data.next_use import ReadPlan
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shard_manifest import Manifest

ORDER_KEY = 0x5A4D  # keeps the window shuffle's stream apart from the folder layout's


def epoch_order(manifest: Manifest, seed: int, epoch: int, window: int) -> np.ndarray:
    """The training sample ids of ``epoch`` in order (a permutation of the train split).

    Pure function of (manifest, seed, epoch, window); see the module docstring.
    """
    train = manifest.split("train")
    shards = np.asarray(manifest.shard_ids("train"))
    rng = np.random.default_rng([seed, epoch, ORDER_KEY])
    if window <= 0 or window >= len(shards):
        return rng.permutation(len(train))
    # The train split is stored shard after shard: shard k's samples are a contiguous run of ids.
    counts = np.array([manifest.shards[s].samples for s in shards])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = rng.permutation(len(shards))
    out = []
    for w in range(0, len(order), window):
        ids = np.concatenate([np.arange(starts[k], starts[k] + counts[k]) for k in order[w : w + window]])
        out.append(ids[rng.permutation(len(ids))])
    return np.concatenate(out)


def shards_in_order(manifest: Manifest, split: str, ids: np.ndarray) -> list[int]:
    """The shards holding ``ids``, in the order of their first sample there."""
    shard = manifest.split(split).shard[ids]
    _, first = np.unique(shard, return_index=True)
    return [int(shard[i]) for i in np.sort(first)]


class ShardReader:
    """What the feed calls per batch: encoded images of sample ids, prefetching ahead.

    With an order (training), the cache follows it (``next_use.ReadPlan``) as the node's ranks
    (``node_ranks`` of ``world_size``; None: every rank) read it: it pins the shards of the
    current windows, evicts by next read, and is asked to prefetch again at each epoch and, when
    the dataset does not fit, each time the windows move on.
    """

    def __init__(self, manifest: Manifest, cache: ShardCache, split: str, order: Callable[[int], np.ndarray] | None,
                 global_batch: int = 0, node_ranks: Sequence[int] | None = None, world_size: int = 1):  # fmt: skip
        self.m, self.cache, self.split, self.order, self.global_batch = (
            manifest,
            cache,
            split,
            order,
            global_batch,
        )
        self.samples = manifest.split(split)
        self.checked = np.zeros(len(self.samples), bool)  # CRC-32 verified by this process
        self._planned: int | None = None  # the epoch whose shards were queued
        if order is not None:
            cache.follow(ReadPlan(manifest, order, global_batch, node_ranks, world_size))

    def __call__(self, ids: np.ndarray, epoch: int, step: int) -> list[np.ndarray]:
        moved = self.cache.at(epoch, step)
        if self._planned != epoch or (moved and self.cache.bounded):
            # This epoch's shards from here on, then the next epoch's (the feed runs on); as
            # many as the limit holds when the dataset does not fit.
            self.cache.prefetch(self.cache.ahead())
            self._planned = epoch
        return self.read(ids)

    def read(self, ids: Any) -> list[np.ndarray]:
        s = self.samples
        seen = self.checked[ids].tolist()
        crcs = [None if known else crc for crc, known in zip(s.crc32[ids].tolist(), seen, strict=True)]
        out = self.cache.read_samples(
            s.shard[ids].tolist(), s.offset[ids].tolist(), s.size[ids].tolist(), crcs
        )
        self.checked[ids] = True
        return out
