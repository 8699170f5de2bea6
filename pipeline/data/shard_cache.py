"""One shard cache per node: every rank on the node shares it, each shard is fetched once per use.

    cache = ShardCache(manifest, cache_dir="/local/nvme/shards", fetchers=4, limit_bytes=0)
    cache.check_limit(global_batch=256)           # a clear error at start when the limit is too small
    cache.follow(ReadPlan(manifest, order, 256))  # the training order: what eviction looks ahead at
    cache.at(epoch, step)                         # where this process reads now
    cache.prefetch(cache.ahead())                 # shard ids in the order the feed will need them
    jpeg = cache.read(shard_id, offset, size, crc32)   # uint8 array; crc32=None: checked before

Layout on disk: shards named by content, ``CACHE_DIR/shards/<sha256>.tar``, beside each its ``.ok``
(size, SHA-256 and mtime as verified) and ``.lock``: a shard two manifests name (``data shard`` run
again after an upgrade) is one file, fetched once. ``CACHE_DIR/<16 hex of the manifest's
SHA-256>/dataset.json`` records a dataset's shards (``cache_folders``: ``data cache ls|prune``);
``CACHE_DIR/ledger.json`` accounts for every process using the folder (``cache_ledger``). Files are
readable by the group and others, the ledger group-writable, so two users of a node can share a
cache. The protocol, the same in every process of the node:

- a shard is usable when its ``.ok`` names the manifest's size and SHA-256 and the file's size
  and mtime are still those recorded (a truncated or rewritten file is not used);
- to fetch, a process takes an exclusive ``flock`` on ``.lock`` (a prefetch that finds it held
  skips to the next shard: another rank is fetching this one), looks again (another rank may
  have fetched it meanwhile), makes room for it under the ledger's lock (below), takes one of
  the node's ``data.cache_fetchers`` slots (``cache_slots``: one budget per node), streams the
  object into a temporary file beside it through the fetch engine (``pipeline.data.fetch``:
  ranged GETs of 8 MiB, several at once, hashed as they arrive, retried through throttling and
  resets for ``data.fetch_retry_s``), checks its size and SHA-256 against the manifest, renames
  it into place and writes ``.ok``; a bad download is fetched once more, then is an error
  naming the shard;
- every sample is checked against its CRC-32 from the manifest the first time this process reads it
  (the feed keeps a bit per sample); a mismatch drops the shard (under its lock) and fetches it
  again (whole, its SHA-256 checked) unless another process of the node already replaced the copy
  it read (the node's N ranks meeting one bad sample fetch it once, not N times); a second mismatch
  is an error. Later reads of the sample come through the same open file, so from the same bytes,
  and skip the CRC: at ~10 us per 59 KB image it was the largest cost of a cached epoch.

**Bounded by ``data.cache_limit_gb``** (``cache_sizing``): cached shards plus fetches in flight stay
under it; a fetch that would pass it first deletes the shards read furthest ahead (Belady's policy:
``cache_room``, ``eviction``, ``next_use``), never one pinned in the ledger (held open, or read in a
current window). When the dataset does not fit, a process keeps open only its windows' shards.

So a restarted worker, or a second rank, reuses what is there; a crash mid-fetch leaves a temporary
file and no ``.ok`` (the next handle deletes the file: no process holds its shard's lock). A failed
prefetch is not final: the reader that needs the shard fetches it again, with a fresh retry budget.

Cached shards are memory-mapped (a sample is a view of the page cache that DALI copies once, as
its own file reader does). A local ``data.root`` (a disk or a shared mount) is read in place, with
plain reads unless ``data.mmap`` (mapping hurts network filesystems); its shard sizes are checked at
open and each sample against its CRC-32 as above. Nothing truncates a shard in place (fetches and
``data shard`` rename whole files into place), so a mapping never loses its pages.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import tempfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from pipeline.data import cache_sizing
from pipeline.data.cache_folders import DIR_MODE
from pipeline.data.cache_reads import CacheReads
from pipeline.data.cache_room import CacheRoom, remove_dead_temp_files
from pipeline.data.cache_shards import FILE_MODE, SHARDS_FOLDER, open_lock, shard_file
from pipeline.data.cache_slots import FetchSlots
from pipeline.data.fetch import Fetcher, FetchError, FetchPolicy, FetchStats
from pipeline.data.next_use import ReadPlan
from pipeline.data.shard_manifest import Manifest, ShardError, repair_hint
from pipeline.store import locations

DEFAULT_DIR_NAME = "resnet-pipeline-shards"


def default_cache_dir() -> str:
    """``<system temp dir>/resnet-pipeline-shards``: node-local scratch on every cloud image."""
    return os.path.join(tempfile.gettempdir(), DEFAULT_DIR_NAME)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _sample(f: int | np.ndarray, offset: int, size: int) -> np.ndarray:
    """``size`` bytes at ``offset`` of an open shard: a view of its mapping, or read from its fd."""
    return (
        f[offset : offset + size]
        if isinstance(f, np.ndarray)
        else np.frombuffer(os.pread(f, size, offset), np.uint8)
    )


class ShardCache:
    """This process's handle on the node's shard cache for one manifest.

    Args:
        manifest: the dataset.
        cache_dir: the node's cache folder ("" for ``default_cache_dir()``); unused for a local root.
        fetchers: shards in flight on the node, all its processes together (``cache_slots``).
        mmap: map a local root's shards into memory (``data.mmap``); cached shards always are.
        policy: the fetch engine's retries and part size (``data.fetch_retry_s``).
        limit_bytes: the most the folder may hold (``data.cache_limit_gb``); 0: the disk's default.
    """

    def __init__(self, manifest: Manifest, cache_dir: str = "", fetchers: int = 4, mmap: bool = False,
                 policy: FetchPolicy | None = None, limit_bytes: int = 0):  # fmt: skip
        self.manifest = manifest
        self.remote = locations.is_uri(manifest.root)
        self.mapped = self.remote or mmap
        self.setting = cache_dir or default_cache_dir()
        self.root = Path(self.setting).expanduser()
        self.dir = self.root / SHARDS_FOLDER  # every dataset's shards, named by content
        self.fetchers = max(1, int(fetchers))
        self.plan: ReadPlan | None = None
        self._protected: set[int] = set()  # shards with reads left in the current windows
        self._files_named = {shard_file(s.sha256) for s in manifest.shards}
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self._files: dict[int, int | np.ndarray] = {}  # shard -> open fd, or its mapping
        self._inodes: dict[int, int] = {}  # shard -> the inode of the copy opened
        self._lock = threading.Lock()
        self.policy = policy or FetchPolicy()
        self._fetcher: Fetcher | None = None
        self.fetch_stats = FetchStats()  # GETs, retries, seconds waited, bytes: this handle's
        self.reads = CacheReads()  # shard reads and cache hits: this handle's (cache_reads)
        self.dataset_bytes = sum(s.size for s in manifest.shards)
        self.room: CacheRoom | None = None
        if self.remote:
            self._check_writable()
            remove_dead_temp_files(self.dir, self._files_named)
            self.slots = FetchSlots(self.root, self.fetchers)
            self.room = CacheRoom(self.root, manifest, limit_bytes, wait_s=max(60.0, self.policy.retry_s))
        # The dataset does not fit: evict by next use, and keep open only what the windows read.
        self.bounded = self.room is not None and self.room.limit < self.dataset_bytes

    # ------------------------------------------------------------ start-up checks

    def _check_writable(self) -> None:
        try:
            for folder in (self.root, self.dir):
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)  # ranks of a node may race to make it
                    os.chmod(folder, DIR_MODE)
            probe = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe.", delete=True)
            probe.close()
        except OSError as e:
            raise ShardError(
                f"data.cache_dir={self.setting}: cannot write {self.dir} ({e.strerror or e}); set data.cache_dir to "
                "a writable folder on the node's local disk"
            ) from None

    def check_limit(self, window: int, global_batch: int | None = None) -> None:
        """Raise ``ConfigError`` when the limit is below the least that works (``cache_sizing``):
        ``window`` is ``data.shuffle_window``, ``global_batch`` the training batch."""
        if self.room is None:
            return
        need = cache_sizing.minimum_bytes(self.manifest, window, self.fetchers, global_batch)
        cache_sizing.check_limit(self.room.limit, need, explicit=self.room.explicit, cache_dir=self.setting,
                                 window=window, fetchers=self.fetchers)  # fmt: skip

    def describe(self) -> str:
        """The one line said at start: the limit and whether this dataset fits in it."""
        if self.room is None:
            return f"shards read in place from {self.manifest.root} (no cache)"
        return cache_sizing.describe(self.room.limit, self.dataset_bytes, self.room.explicit, self.setting)

    # ------------------------------------------------------------ the read plan and pins

    def follow(self, plan: ReadPlan) -> None:
        """Evict by ``plan``'s next reads, and pin its current windows' shards."""
        self.plan = plan
        if self.room is not None:
            self.room.plan = plan

    def at(self, epoch: int, step: int) -> bool:
        """This process now reads global batch ``step`` of ``epoch``; True when its windows changed
        (the feed then queues the shards ahead again)."""
        if self.plan is None or self.room is None:
            return False
        self.plan.at(epoch, step)
        protected = self.plan.protected()
        if protected == self._protected:
            return False
        self._protected = protected
        if self.bounded:
            self._close_unneeded(protected)
        self._publish()
        return True

    def ahead(self) -> list[int]:
        """Training shards in the order of their next reads, as many as the limit holds."""
        if self.plan is None:
            return []
        upcoming = self.plan.upcoming()
        if not self.bounded:
            return upcoming
        out, total = [], 0
        for i in upcoming:
            total += self.manifest.shards[i].size
            if total > self.room.limit:
                break
            out.append(i)
        return out

    def _close_unneeded(self, keep: set[int]) -> None:
        with self._lock:
            gone = [self._files.pop(i) for i in list(self._files) if i not in keep]
        for f in gone:
            if isinstance(f, int):
                os.close(f)  # a mapping is unmapped when its last view is gone

    def _publish(self, also: set[int] | frozenset = frozenset()) -> None:
        """Tell the ledger what this handle pins: open shards and those its windows still read."""
        with self._lock:
            pinned = self._protected | set(self._files) | also
        self.room.pin(pinned)

    # ------------------------------------------------------------ the protocol

    def _paths(self, i: int) -> tuple[Path, Path, Path]:
        name = shard_file(self.manifest.shards[i].sha256)
        return self.dir / name, self.dir / (name + ".ok"), self.dir / (name + ".lock")

    def cached_path(self, i: int) -> Path:
        """Where shard ``i`` lies in the node's cache (once fetched): ``shards/<sha256>.tar``."""
        return self._paths(i)[0]

    def _valid(self, i: int) -> bool:
        shard = self.manifest.shards[i]
        path, ok, _ = self._paths(i)
        try:
            mark = json.loads(ok.read_text())
            st = path.stat()
        except (OSError, ValueError):
            return False
        return (
            mark.get("sha256") == shard.sha256
            and mark.get("size") == shard.size == st.st_size
            and mark.get("mtime_ns") == st.st_mtime_ns
        )

    def _engine(self) -> Fetcher:
        """This process's fetch engine (its client is built once: that costs more than a GET)."""
        with self._lock:
            if self._fetcher is None:
                in_flight = self.fetchers * self.policy.parts_in_flight
                self._fetcher = Fetcher(self.policy, gets_in_flight=in_flight, stats=self.fetch_stats)
            return self._fetcher

    def _fetch_locked(self, i: int) -> None:
        """Download shard ``i`` into place; the caller holds its lock."""
        shard = self.manifest.shards[i]
        path, ok, _ = self._paths(i)
        where = locations.join(self.manifest.root, shard.name)
        for attempt in (1, 2):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as out:  # the engine gets exactly shard.size bytes, or raises
                    sha = self._engine().fetch(where, shard.size, out)
                if sha == shard.sha256:
                    os.chmod(tmp, FILE_MODE)  # mkstemp made it private
                    os.replace(tmp, path)
                    break
            except FetchError as e:
                if e.status in (404, 416):
                    raise ShardError(
                        f"{where}: {'not found' if e.status == 404 else 'of another size'} ({e.status}), though the "
                        "manifest lists it; "
                        f"{repair_hint(self.manifest.source, self.manifest.root)}"
                    ) from None
                raise ShardError(str(e)) from None
            finally:
                Path(tmp).unlink(missing_ok=True)
            if attempt == 2:
                raise ShardError(
                    f"{where}: its first {shard.size} bytes have SHA-256 {sha[:16]}..., the manifest says "
                    f"{shard.sha256[:16]}... (the shard or the manifest was changed); "
                    f"{repair_hint(self.manifest.source, self.manifest.root)}"
                )
        st = path.stat()
        mark = {"size": shard.size, "sha256": shard.sha256, "mtime_ns": st.st_mtime_ns}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.ok.")
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(mark))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, ok)
        self.reads.fetched(i)

    def ensure(self, i: int, bad_inode: int | None = None, wait: bool = True) -> Path | None:
        """Shard ``i`` on the local disk (fetched under its lock unless a valid copy is there).

        ``bad_inode``: the copy with this inode is bad (a sample failed its CRC): remove it and
        fetch it again, unless it is gone already (another process replaced it: its copy is used).
        ``wait=False`` (prefetching): when another process of the node holds the shard's lock
        (it is fetching it), or no room can be made without evicting a shard read sooner, return
        None at once and go on to the next shard. A fetch waits for one of the node's slots, so
        the node has at most ``fetchers`` shards in flight, each fetched once.
        """
        if not self.remote:
            return Path(
                locations.filesystem(locations.join(self.manifest.root, self.manifest.shards[i].name))[1]
            )
        path, ok, lock = self._paths(i)
        if bad_inode is None and self._valid(i):
            return path
        fd = open_lock(lock)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            if bad_inode is not None and _inode(path) == bad_inode:
                ok.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            if not self._valid(i):
                if not self.room.reserve(i, ahead=not wait):
                    return None
                try:
                    with self.slots.taken():  # the node's budget: data.cache_fetchers at once
                        self._fetch_locked(i)
                finally:
                    self.room.unreserve(i)
        finally:
            os.close(fd)  # closing drops the flock
        return path

    # ------------------------------------------------------------ prefetch and reads

    def prefetch(self, shard_ids: list[int]) -> None:
        """Fetch these shards in this order, ``fetchers`` at once, in the background."""
        if not self.remote:
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.fetchers, thread_name_prefix="shard-fetch")
            for i in shard_ids:
                i = int(i)
                known = self._futures.get(i)
                # Again when it failed, or was skipped (being fetched elsewhere, or no room then).
                if known is None or (
                    known.done() and (known.exception() is not None or known.result() is None)
                ):
                    self._futures[i] = self._pool.submit(self.ensure, i, None, False)

    def _file(self, i: int, drop: bool = False) -> int | np.ndarray:
        """Shard ``i`` opened for reads: its mapping, or an fd (checked when opened)."""
        with self._lock:
            if not drop and i in self._files:
                return self._files[i]
            future = self._futures.get(i)
        if future is not None and not drop:
            wait([future])  # its error is not final: ensure() below fetches again, with a fresh budget
        if self.room is not None and i not in self._protected:
            self._publish({i})  # pinned before it is fetched or opened
        path = self.ensure(i, bad_inode=self._inodes.get(i) if drop else None)
        with self._lock:
            old = self._files.pop(i, None) if drop else None
            if i not in self._files:
                self._files[i], self._inodes[i] = self._open(path)
            f = self._files[i]
        if isinstance(old, int):
            os.close(old)  # a dropped mapping is unmapped when its last view is gone
        return f

    def _open(self, path: Path) -> tuple[int | np.ndarray, int]:
        """(the open fd or its mapping, the file's inode)."""
        fd = os.open(path, os.O_RDONLY)
        inode = os.fstat(fd).st_ino
        if not self.mapped:
            return fd, inode
        try:
            return np.frombuffer(mmap.mmap(fd, 0, prot=mmap.PROT_READ), np.uint8), inode
        finally:
            os.close(fd)  # the mapping keeps the file

    def read(self, i: int, offset: int, size: int, crc32: int | None) -> np.ndarray:
        """One sample's bytes from shard ``i`` (uint8), checked against ``crc32`` unless it is None."""
        return self.read_samples([i], [offset], [size], [crc32])[0]

    def read_samples(self, shards: list[int], offsets: list[int], sizes: list[int],
                     crc32s: list[int | None]) -> list[np.ndarray]:  # fmt: skip
        """Samples' bytes (uint8 arrays), each checked against its CRC-32 unless that is None.

        A mismatch fetches a remote shard again and reads once more; then it is an error. The
        loop is the feed's per-image cost: it does nothing a sample does not need.
        """
        files, out = self._files, []
        for i, offset, size, crc in zip(shards, offsets, sizes, crc32s, strict=True):
            f = files.get(i)
            if f is None:
                f = self._file(i)
            data = _sample(f, offset, size)
            if crc is not None and (len(data) != size or zlib.crc32(data) != crc):
                data = self._read_again(i, offset, size, crc)
            out.append(data)
        self.reads.read(shards)  # after the reads: a shard fetched for them is a miss
        if self.bounded and len(files) > len(self._protected):
            self._drop_others(set(shards))  # validation: shards read past are let go
        return out

    def _drop_others(self, reading: set[int]) -> None:
        """Close and unpin shards neither in the current windows nor in this batch."""
        keep = (self.plan.protected() if self.plan is not None else set()) | reading
        with self._lock:
            self._protected = keep
        self._close_unneeded(keep)
        self._publish()

    def _read_again(self, i: int, offset: int, size: int, crc32: int) -> np.ndarray:
        shard = self.manifest.shards[i]
        if self.remote:
            data = _sample(self._file(i, drop=True), offset, size)
            if len(data) == size and zlib.crc32(data) == crc32:
                return data
        raise ShardError(
            f"{locations.join(self.manifest.root, shard.name)}: the sample at byte {offset} ({size} bytes) does not "
            f"match its CRC-32 in the manifest (the shard and the manifest disagree); "
            f"{repair_hint(self.manifest.source, self.manifest.root)}"
        )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            files, self._files = self._files, {}
            self._futures = {}
            fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.close()  # fetches retrying through a storm give up now
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for f in files.values():
            if isinstance(f, int):
                os.close(f)
        room, self.room = getattr(self, "room", None), None
        if room is not None:
            room.leave()

    def __del__(self) -> None:  # the feed's cache lives as long as its loader
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
