"""How big a node's shard cache may grow (``data.cache_limit_gb``), and the least that works.

    limit = resolve_limit(0, Path("/local/nvme/shards"), cached_bytes)   # 0: the disk's default
    need = minimum_bytes(manifest, window=16, fetchers=4, global_batch=256)
    check_limit(limit, need, explicit=False, ...)                         # ConfigError when too small

The default is what the disk has free, plus what the cache already holds there, less a
headroom of 10 % of the disk (at least 5 GB) for logs, checkpoints and the page cache's
writeback. A limit below the whole dataset makes the cache evict by next use
(``pipeline.data.eviction``). It cannot go below one window of shards for every global batch
(the shards a rank reads next are all in it, so none of them may go) plus the shards fetched
ahead: below that, a rank would wait for room that never comes, so the start refuses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.next_use import window_bytes_bound
from pipeline.data.shard_manifest import Manifest

GB = 1e9
HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = int(5 * GB)


def default_limit(folder: Path, cached_bytes: int) -> int:
    """The disk's free bytes plus the cache's own, less 10 % of the disk (at least 5 GB)."""
    usage = shutil.disk_usage(folder)
    headroom = max(int(HEADROOM_FRACTION * usage.total), HEADROOM_MIN_BYTES)
    return max(0, usage.free + cached_bytes - headroom)


def minimum_bytes(manifest: Manifest, window: int, fetchers: int, global_batch: int | None) -> int:
    """One window of shards for the current global batch (two when the batch is unknown: it may
    straddle a boundary), plus ``fetchers`` of the largest shards in flight."""
    largest = max(s.size for s in manifest.shards)
    return window_bytes_bound(manifest, window, global_batch) + max(1, fetchers) * largest


def check_limit(limit: int, need: int, *, explicit: bool, cache_dir: str, window: int, fetchers: int) -> None:
    """Refuse a limit below ``need`` with the setting to use, before any shard is fetched."""
    if limit >= need:
        return
    given = (
        f"data.cache_limit_gb={limit / GB:g}"
        if explicit
        else f"data.cache_dir={cache_dir} leaves {limit / GB:.2f} GB (its disk's free space less a "
        f"headroom of {HEADROOM_FRACTION:.0%}, at least {HEADROOM_MIN_BYTES / GB:g} GB)"
    )
    raise ConfigError(
        f"{given}: the shard cache needs at least {need / GB:.3g} GB on each node (the shards of "
        f"data.shuffle_window={window} that a global batch reads, plus data.cache_fetchers={fetchers} "
        f"shards in flight); set data.cache_limit_gb={_round_up(need / GB)} or more"
        + ("" if explicit else " on a disk with that much room (data.cache_dir)")
    )


def _round_up(gb: float) -> str:
    """``gb`` rounded up to 3 significant digits, so the number suggested is enough."""
    digits = max(0, 2 - int(f"{gb:e}".split("e")[1]))
    scale = 10**digits
    return f"{-(-gb * scale // 1) / scale:g}"


def describe(limit: int, dataset_bytes: int, explicit: bool, cache_dir: str) -> str:
    """The one line said at start: the limit chosen, and what it means for this dataset."""
    where = "data.cache_limit_gb" if explicit else "the disk's free space less headroom"
    what = (
        "holds a whole copy"
        if limit >= dataset_bytes
        else "evicts the shard read furthest ahead (next use) when full"
    )
    return (
        f"shard cache {cache_dir}: limit {limit / GB:.3g} GB ({where}); the dataset is "
        f"{dataset_bytes / GB:.3g} GB, so it {what}"
    )
