"""What reading the dataset from object storage cost: the ``data/*`` figures of the sharded layout.

    figures = FetchFigures.for_run(run)     # pipeline.train.setup.Run; one per worker, kept for the run
    figures.read("epoch")   # {"data/get_retries": 3, "data/fetch_wait_s": 0.4, ...} since the last one
    figures.read("run")     # since the cache opened (summary.json, at the end); "epoch" goes on

Each worker's shard cache counts what its process did (``pipeline.data.shard_feed.fetch_counts``:
the fetch engine's GETs, retries, backoff and bytes, and the shard reads that found the shard in
the node's cache). ``read`` sums those counts over every rank (one all-reduce: every rank calls
it at the same points) and turns them into:

- ``data/get_retries``: GETs (and HEADs) that failed and were tried again: 503 SlowDown, 5xx,
  a reset or cut body, a GET with no byte for ``request_timeout_s``;
- ``data/fetch_wait_s``: seconds the fetch engine waited between a failed GET and its retry (the
  backoff), summed over the GETs in flight, so it may exceed the window's wall time; the time a
  step waited for its batch is ``perf/data_wait_s``;
- ``data/bytes_fetched``: bytes received by GETs that succeeded (a retried part counts once);
- ``data/cache_hit_rate``: the shard reads served from the node's cache over all shard reads
  (``pipeline.data.cache_reads``: a shard counts once per window per process, at its first read;
  a miss when this process fetched it). Absent in a window with no shard reads.

Layouts that fetch nothing (image folders, CIFAR-10, shards on a local or mounted disk) give
``{}``, so their records hold no ``data/*`` key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pipeline.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from pipeline.train.setup import Run

COUNTS = ("retries", "wait_s", "bytes", "shard_reads", "cache_hits")


@dataclass
class FetchFigures:
    """One worker's ``data/*`` figures in two windows: since the previous epoch record, and the run.

    Args:
        counts: the worker's cumulative counters (``Data.fetch_counts``), or None (nothing fetched).
        device: where the all-reduce runs (the worker's device: NCCL reduces GPU tensors only).
    """

    counts: Callable[[], dict[str, float]] | None
    device: torch.device
    _previous: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0.0))

    @classmethod
    def for_run(cls, run: Run) -> FetchFigures:
        return cls(run.data.fetch_counts, run.ctx.device)

    def read(self, window: str) -> dict[str, float]:
        """The ``data/*`` figures since the previous ``read("epoch")`` (``window="epoch"``, which
        starts the next window) or since the cache opened (``"run"``), summed over the ranks."""
        if self.counts is None:
            return {}
        now = self.counts()
        since = self._previous if window == "epoch" else dict.fromkeys(COUNTS, 0.0)
        if window == "epoch":
            self._previous = now
        local = torch.tensor([now[k] - since[k] for k in COUNTS], dtype=torch.float64)
        return figures(dict(zip(COUNTS, all_reduce_sum(local.to(self.device)).tolist(), strict=True)))


def figures(c: dict[str, float]) -> dict[str, float]:
    """``data/*`` from summed counts (``COUNTS``); no hit rate without a shard read."""
    out: dict[str, float] = {
        "data/get_retries": int(c["retries"]),
        "data/fetch_wait_s": c["wait_s"],
        "data/bytes_fetched": int(c["bytes"]),
    }
    if c["shard_reads"] > 0:
        out["data/cache_hit_rate"] = c["cache_hits"] / c["shard_reads"]
    return out
