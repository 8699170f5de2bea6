"""The node's budget of shard fetches in flight: ``data.cache_fetchers`` slots, shared by every
process that uses the cache folder.

    slots = FetchSlots(Path("/local/nvme/shards"), count=4)
    with slots.taken():          # waits for one of the node's 4 slots
        ...                      # fetch one shard

A slot is a lock file, ``CACHE_DIR/fetch-slots/<k>.lock`` for k < count, held with ``flock``. So
the node's ranks together keep at most ``count`` shards in flight (each as ranged GETs of 8 MiB,
``FetchPolicy.parts_in_flight`` at once), however many ranks the node runs: the bucket and the
node's network see one budget, and the cache's minimum size (``cache_sizing``) counts that many
shards in flight. The kernel drops a dead process's ``flock``, so a killed worker frees its slot
with nothing to clean up. Two processes given different counts share the first slots: the node
keeps at most the larger count in flight.

A slot is taken only for the download itself, after the shard's lock is held and its room is
reserved, and released before anything else is waited for: a process holding a slot waits on
nothing but the bucket, so slots cannot deadlock with shard locks or with room in the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.data.cache_folders import DIR_MODE
from pipeline.data.cache_shards import open_lock

SLOTS_FOLDER = "fetch-slots"
POLL_S = 0.02  # how often a fetch waiting for a slot looks again (a fetch takes far longer)


class FetchSlots:
    """This process's handle on the node's fetch slots under ``root`` (the cache folder)."""

    def __init__(self, root: Path, count: int):
        self.folder = root / SLOTS_FOLDER
        self.count = max(1, int(count))
        if not self.folder.is_dir():
            self.folder.mkdir(exist_ok=True)
            with contextlib.suppress(PermissionError):  # made by another user's process meanwhile
                os.chmod(self.folder, DIR_MODE)  # another user's processes take slots too
        self.waits = 0  # fetches that found every slot taken (the budget was full)

    def _try(self) -> int | None:
        for k in range(self.count):
            fd = open_lock(self.folder / f"{k}.lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    @contextmanager
    def taken(self) -> Iterator[None]:
        """Hold one slot for the block, waiting until one is free."""
        fd = self._try()
        if fd is None:
            self.waits += 1
            while fd is None:
                time.sleep(POLL_S)
                fd = self._try()
        try:
            yield
        finally:
            os.close(fd)  # closing drops the flock
