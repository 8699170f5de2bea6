"""The ledger of a shard cache folder: what every process using the folder holds, under one lock.

    ledger = Ledger(Path("/local/nvme/shards"))
    with ledger.entries() as entries:       # flock'ed; entries of dead processes already dropped
        entries[ledger.key] = {"dataset": ..., "limit": ..., "pinned": [...], "reserved": {...}}
    on_disk(Path("/local/nvme/shards"))     # {"shards/<sha256>.tar": (bytes, mtime_ns)}

Several processes share a node's cache folder: the ranks of a job, and sometimes two jobs (on
one dataset or two). The bytes on the disk are the cached shards (``on_disk``, the truth, read
from the folder) plus the fetches in flight (``reserved`` in the ledger: a temporary file grows
to the shard's size). So before a fetch a process takes the ledger's lock, adds what is cached
to what every live process has reserved, evicts if that with the new shard passes the limit,
and reserves the shard's bytes; after it, it drops the reservation. The limit is the smallest
that a live process was given, so two jobs with different settings stay under both.

``pinned`` lists the shards a process holds open or will read in its current window: no other
process evicts them. An entry is keyed by the process id and its start time (a reused pid is
another process) plus a number per cache handle; the entries of processes that are gone (a
killed worker) are dropped whenever the ledger is opened. The ledger is a small JSON file
(``ledger.json``) rewritten whole beside its lock file (``ledger.lock``), both group-writable
so that two users of one node can share the folder.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LEDGER_NAME = "ledger.json"
LOCK_NAME = "ledger.lock"
SHARED_MODE = 0o664  # the ledger: every user of the folder writes it
_handles = itertools.count()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc``), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 counts from the command's closing paren


def is_alive(key: str) -> bool:
    """Whether the process that wrote the entry ``key`` (``pid:start:handle``) still runs."""
    pid, start, _ = key.split(":", 2)
    return _start_time(int(pid)) == start


def on_disk(folder: Path) -> dict[str, tuple[int, int]]:
    """Cached shards under ``folder``: ``"shards/<sha256>.tar"`` -> (bytes, mtime_ns), and those of
    the layout before content names (``"<dataset>/<name>.tar"``), which eviction takes first.

    Only finished shards count: temporary files of fetches are covered by their reservations.
    """
    found = {}
    for sub in os.scandir(folder) if folder.is_dir() else ():
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        for f in os.scandir(sub.path):
            if f.name.endswith(".tar") and not f.name.startswith("."):
                try:
                    st = f.stat()
                except FileNotFoundError:  # evicted meanwhile by a process that holds no ledger lock
                    continue
                found[f"{sub.name}/{f.name}"] = (st.st_size, st.st_mtime_ns)
    return found


def live_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """The live processes' entries in ``folder``'s ledger; {} when there is none yet or a crash
    tore it (the disk still says what is cached). Without the ledger's lock (``Ledger.entries``)
    this is fit to show, not to decide on: the file is replaced whole, never written in place."""
    try:
        doc = json.loads((folder / LEDGER_NAME).read_text())
        return {k: v for k, v in doc.get("processes", {}).items() if is_alive(k)}
    except (OSError, ValueError, AttributeError):
        return {}


class Ledger:
    """This cache handle's view of the folder's ledger."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key = f"{os.getpid()}:{_start_time(os.getpid())}:{next(_handles)}"

    @contextmanager
    def entries(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The live processes' entries, under the ledger's lock; written back when the block ends."""
        lock = self.folder / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, SHARED_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _share(lock)
            path = self.folder / LEDGER_NAME
            entries = live_entries(self.folder)
            yield entries
            tmp_fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{LEDGER_NAME}.")
            with os.fdopen(tmp_fd, "w") as out:
                json.dump({"processes": entries}, out)
            os.chmod(tmp, SHARED_MODE)
            os.replace(tmp, path)
        finally:
            os.close(fd)  # closing drops the flock

    def leave(self) -> None:
        """Drop this handle's entry (its pins and reservations): the handle is closed."""
        with self.entries() as entries:
            entries.pop(self.key, None)


def _share(path: Path) -> None:
    """Make ``path`` group-writable when this user owns it (another user's file is left alone)."""
    try:
        if path.stat().st_uid == os.getuid():
            os.chmod(path, SHARED_MODE)
    except OSError:
        pass
