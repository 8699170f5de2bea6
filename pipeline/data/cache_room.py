"""One cache handle's share of a node's cache folder: its limit, its pins, its fetches in flight.

    room = CacheRoom(Path("/local/nvme/shards"), manifest, limit_bytes=0, wait_s=600)
    room.plan = read_plan                 # eviction looks ahead at this job's order
    room.pin({3, 17})                     # shards this handle holds open or reads next
    if room.reserve(i, ahead=False):      # room for shard i (evicting if needed), then fetch it
        ...; room.unreserve(i)

Everything happens under the ledger's lock (``pipeline.data.cache_ledger``): what the disk holds
plus every live process's reservations, against the smallest limit any of them was given; the
victims come from ``pipeline.data.eviction``, each deleted under its shard lock (one being
fetched or checked stays). A read that needs its shard waits, polling, for other processes to
unpin enough (ranks move on to the next window); after ``wait_s`` it is an error that says to
raise ``data.cache_limit_gb``.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import cache_sizing
from pipeline.data.cache_folders import read_record, record_use, touch_record
from pipeline.data.cache_ledger import Ledger, on_disk
from pipeline.data.cache_shards import SHARDS_FOLDER, delete_unlocked, named_shards, open_lock, shard_file
from pipeline.data.eviction import choose_victims
from pipeline.data.next_use import NEVER, ReadPlan
from pipeline.data.shard_manifest import Manifest, ShardError

POLL_S = 0.2  # how often a read waiting for room looks again


def remove_dead_temp_files(folder: Path, shard_files: set[str]) -> None:
    """Delete the temporary files of fetches whose process died (no one holds their shard's lock):
    the room they took is free again."""
    for f in os.scandir(folder):
        if not f.name.startswith(".") or f.name.startswith(".probe."):
            continue
        name = f.name[1:].split(".tar", 1)[0] + ".tar"
        if name not in shard_files:
            continue
        fd = open_lock(folder / (name + ".lock"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            Path(f.path).unlink(missing_ok=True)
        except BlockingIOError:
            pass  # a live fetch is writing it
        finally:
            os.close(fd)


class CacheRoom:
    """This handle's entry in the folder's ledger, and the evictions it makes.

    Args:
        root: the cache folder (``data.cache_dir``), every dataset's.
        manifest: this job's dataset (its record in ``root/<first 16 hex of its digest>``, its
            shards in ``root/shards/<sha256>.tar``).
        limit_bytes: ``data.cache_limit_gb`` in bytes; 0: the disk's default (``cache_sizing``).
        wait_s: how long a read waits for room before it is an error.
    """

    def __init__(self, root: Path, manifest: Manifest, limit_bytes: int, wait_s: float):
        self.root, self.manifest, self.wait_s = root, manifest, wait_s
        self.dataset = manifest.digest[:16]
        self.explicit = limit_bytes > 0
        self.plan: ReadPlan | None = None
        self.evictions = 0  # shards this handle deleted to make room
        self._ids: dict[str, list[int]] = {}  # "shards/<sha256>.tar" -> the shards with those bytes
        for i in range(len(manifest.shards)):
            self._ids.setdefault(self.name(i), []).append(i)
        self.mine = set(self._ids)
        self._named: dict[str, set[str]] = {self.dataset: self.mine}  # dataset -> the names it names
        self._pinned: set[int] = set()
        self.ledger = Ledger(root)
        with self.ledger.entries() as entries:
            cached = sum(size for size, _ in on_disk(root).values())
            self.limit = limit_bytes if self.explicit else cache_sizing.default_limit(root, cached)
            self._entry(entries)
            # Under the ledger's lock: from here on `data cache prune` sees the folder in use (and
            # a folder a prune took before it is made again).
            try:
                record_use(root / self.dataset, manifest)
            except OSError as e:
                raise ShardError(
                    f"{root / self.dataset}: cannot write its dataset record ({e}); set "
                    "data.cache_dir to a writable folder on the node's local disk"
                ) from None

    def name(self, i: int) -> str:
        """Shard ``i`` as the ledger names it: ``shards/<sha256>.tar``."""
        return f"{SHARDS_FOLDER}/{shard_file(self.manifest.shards[i].sha256)}"

    def _live_names(self, entries: dict[str, Any]) -> set[str]:
        """The shards that the datasets of live processes name (each dataset's record read once)."""
        out: set[str] = set()
        for dataset in {e["dataset"] for e in entries.values()}:
            if dataset not in self._named:
                record = read_record(self.root / dataset)
                if not record:  # not written yet, or a process of an older version: ask again later
                    continue
                self._named[dataset] = {f"{SHARDS_FOLDER}/{n}" for n in named_shards(record)}
            out |= self._named[dataset]
        return out

    def _entry(self, entries: dict[str, Any]) -> dict[str, Any]:
        return entries.setdefault(
            self.ledger.key, {"dataset": self.dataset, "limit": self.limit, "pinned": [], "reserved": {}}
        )

    def pin(self, shards: set[int]) -> None:
        """Tell the ledger that these shards (and no others of this handle's) must stay."""
        if shards == self._pinned:
            return
        with self.ledger.entries() as entries:
            self._entry(entries)["pinned"] = sorted(self.name(i) for i in shards)
        self._pinned = set(shards)

    def reserve(self, i: int, ahead: bool) -> bool:
        """Room for shard ``i`` reserved (evicting if needed). A prefetch (``ahead``) returns False
        when no room can be made without dropping a shard read sooner; a read waits for room."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with self.ledger.entries() as entries:
                if self._make_room(entries, i, ahead):
                    return True
            if ahead:
                return False
            if time.monotonic() > deadline:
                raise ShardError(
                    f"{self.name(i)}: no room under the shard cache's limit of {self.limit / 1e9:.3g} GB "
                    f"for {self.wait_s:.0f} s (every cached shard is in use: by other jobs on the node, "
                    "or by ranks far apart); raise data.cache_limit_gb"
                )
            time.sleep(POLL_S)

    def unreserve(self, i: int) -> None:
        """The fetch of shard ``i`` is over (its bytes are on the disk now, or gone)."""
        with self.ledger.entries() as entries:
            self._entry(entries)["reserved"].pop(self.name(i), None)

    def leave(self) -> None:
        self.ledger.leave()
        touch_record(self.root / self.dataset)  # the dataset's last use, for `data cache ls`

    def _next_use(self, names: list[str]) -> np.ndarray:
        if self.plan is None:
            return np.full(len(names), NEVER, np.int64)
        if not names:
            return np.empty(0, np.int64)
        groups = [self._ids[n] for n in names]  # one file may hold several identical shards: the soonest
        uses = self.plan.next_use([i for group in groups for i in group])
        starts = np.concatenate([[0], np.cumsum([len(g) for g in groups])[:-1]])
        return np.minimum.reduceat(uses, starts)

    def _make_room(self, entries: dict[str, Any], i: int, ahead: bool) -> bool:
        mine = self._entry(entries)
        cached = on_disk(self.root)
        name, need = self.name(i), self.manifest.shards[i].size
        reserved = sum(sum(e["reserved"].values()) for e in entries.values())
        room = min(e["limit"] for e in entries.values()) - sum(b for b, _ in cached.values()) - reserved
        if need > room:
            held = [set(e["pinned"]) | set(e["reserved"]) for e in entries.values()]
            pinned = {name}.union(*held)
            # Another live job's folder of the layout before; this job's own old copy may go.
            datasets = {e["dataset"] for e in entries.values()} - {mine["dataset"]}
            live = self._live_names(entries) | {n for n in cached if n.split("/", 1)[0] in datasets}
            before = int(self._next_use([name])[0]) if ahead else None
            victims = choose_victims(cached, pinned, live, self.mine, self._next_use, need - room, before)
            if victims is None:
                return False
            room += self._evict(victims, cached)
            if need > room:
                return False
        mine["reserved"][name] = need
        return True

    def _evict(self, victims: list[str], cached: dict[str, tuple[int, int]]) -> int:
        """Delete these shards, each under its lock (one being fetched stays); the bytes freed."""
        freed = 0
        for victim in victims:
            gone = delete_unlocked(self.root / victim)
            freed += gone
            self.evictions += gone > 0
        return freed
