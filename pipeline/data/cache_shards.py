"""Cached shards named by their content: ``CACHE_DIR/shards/<sha256>.tar``, and deleting one safely.

    shard_file("9f86d0...")                 # "9f86d0....tar": the name of a shard with that SHA-256
    shard_files(Path("/mnt/shard-cache"))   # {"9f86d0....tar": (bytes, mtime)} of finished shards
    delete_unlocked(path)                   # bytes freed; 0 when a process holds its lock

Beside each ``<sha256>.tar`` lie ``.ok`` (the size, SHA-256 and mtime verified) and ``.lock`` (taken
with ``flock`` by the process fetching or checking it): ``pipeline.data.shard_cache``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

SHARDS_FOLDER = "shards"
FILE_MODE = 0o644  # cached shards, their marks and locks: any user of the node may read them


def shard_file(sha256: str) -> str:
    return f"{sha256}.tar"


def named_shards(record: dict[str, Any]) -> set[str]:
    """The shard files a dataset's ``dataset.json`` names (none for a record of the old layout)."""
    return {shard_file(sha) for sha in record.get("sha256s", ())}


def shard_files(root: Path) -> dict[str, tuple[int, float]]:
    """The finished shards in ``root/shards``: file name -> (bytes, mtime in seconds)."""
    folder, found = root / SHARDS_FOLDER, {}
    for f in os.scandir(folder) if folder.is_dir() else ():
        if f.name.endswith(".tar") and not f.name.startswith("."):
            try:
                st = f.stat()
            except FileNotFoundError:  # evicted meanwhile
                continue
            found[f.name] = (st.st_size, st.st_mtime)
    return found


def open_lock(path: Path) -> int:
    """A read-only fd on a lock file (``flock`` needs no write access), created readable by all."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE)
    st = os.fstat(fd)
    if st.st_uid == os.getuid() and st.st_mode & 0o777 != FILE_MODE:
        os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
    return fd


def delete_unlocked(path: Path) -> int:
    """Delete the shard at ``path`` and its ``.ok`` unless a process holds its lock (fetching or
    checking it); the bytes freed."""
    fd = open_lock(path.with_name(path.name + ".lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return 0
    try:
        size = path.stat().st_size if path.exists() else 0
        path.with_name(path.name + ".ok").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return size
    finally:
        os.close(fd)
