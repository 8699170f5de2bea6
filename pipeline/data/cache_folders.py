"""The datasets a node's shard cache folder holds, and removing those no job needs.

    for found in scan(Path("/mnt/shard-cache")):          # one per dataset folder
        print(describe(found))
    result = prune(Path("/mnt/shard-cache"), keep={"3f2a9c1d0b4e5f67": "s3://bucket/imagenet-shards"})

The folder (``data.cache_dir``) holds one sub-folder per dataset, named by the first 16 hex digits
of its manifest's SHA-256 (``pipeline.data.shard_cache``), and ``ledger.json``, where every live
process using the folder has an entry naming its dataset (``pipeline.data.cache_ledger``). Each
cache handle writes ``dataset.json`` into its dataset's folder when it opens (under the ledger's
lock) and touches it when it closes: the dataset's root and source as the manifest names them,
its number of shards and bytes, and, by the file's time, its last use.

A prune renames each folder it removes to a hidden name while it holds the ledger's lock, and only
when no live entry names that dataset; a cache handle registers under the same lock and makes its
folder again if it is gone, so a job that starts during a prune finds its folder (empty) rather
than a half-deleted one. The renamed folders are deleted after the lock is let go; a prune killed
midway leaves hidden folders that the next prune deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.cache_ledger import Ledger, live_entries

RECORD_NAME = "dataset.json"
# A dataset folder's name, as the cache makes it: nothing else under the folder is listed or
# removed, so a --cache-dir pointed at the wrong place (/tmp, say) removes nothing of others'.
DATASET_FOLDER = re.compile(r"[0-9a-f]{16}")
PRUNING_PREFIX = ".pruning-"  # a folder being deleted by a prune
DIR_MODE = 0o775  # the folders a cache makes (shard_cache imports it): the group may fetch into them too
RECORD_MODE = 0o664


def record_use(folder: Path, manifest: Any) -> None:
    """Write ``folder/dataset.json`` for ``manifest`` (the folder made if a prune took it): what
    the folder caches; its time is the dataset's last use. Best effort: the cache works without it."""
    try:
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, DIR_MODE)
        doc = {
            "root": manifest.root,
            "source": manifest.source,
            "digest": manifest.digest,
            "shards": len(manifest.shards),
            "bytes": sum(s.size for s in manifest.shards),
        }
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RECORD_NAME}.")
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out)
        os.chmod(tmp, RECORD_MODE)
        os.replace(tmp, folder / RECORD_NAME)
    except OSError:
        pass


def touch_record(folder: Path) -> None:
    """The dataset was used until now (a cache handle closed)."""
    try:
        os.utime(folder / RECORD_NAME)
    except OSError:
        pass


@dataclass
class CachedDataset:
    """One dataset folder of a cache, as ``ls`` shows it."""

    name: str  # the folder: the first 16 hex digits of the manifest's SHA-256
    path: Path
    record: dict[str, Any]  # dataset.json ({} for a folder written before it existed)
    shards: int  # finished shards (``<name>.tar``) in the folder
    bytes: int  # every file in the folder: what removing it frees
    last_use: float  # the newest file time in the folder (seconds since the epoch)
    users: list[int] = field(default_factory=list)  # pids of live processes using it (the ledger)


def _folder(path: Path) -> CachedDataset:
    shards, size, newest = 0, 0, 0.0
    for f in os.scandir(path):
        try:
            st = f.stat(follow_symlinks=False)
        except FileNotFoundError:  # evicted meanwhile
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime)
        shards += f.name.endswith(".tar") and not f.name.startswith(".")
    try:
        record = json.loads((path / RECORD_NAME).read_text())
    except (OSError, ValueError):
        record = {}
    return CachedDataset(path.name, path, record, shards, size, newest)


def _dataset_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if DATASET_FOLDER.fullmatch(p.name) and p.is_dir())


def _tree_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # another prune is deleting it
            pass
    return total


def _users(entries: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Dataset folder -> pids of the live processes whose entries name it."""
    users: dict[str, list[int]] = {}
    for key, entry in entries.items():
        pid = int(key.split(":", 1)[0])
        if pid not in users.setdefault(entry.get("dataset", ""), []):
            users[entry.get("dataset", "")].append(pid)
    return users


def scan(root: Path) -> list[CachedDataset]:
    """Every dataset folder of the cache at ``root``, with the live processes using each."""
    users = _users(live_entries(root))
    found = [_folder(p) for p in _dataset_folders(root)]
    for d in found:
        d.users = users.get(d.name, [])
    return found


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def describe(d: CachedDataset) -> str:
    """One line: folder, root (and source), shards, size, last use, and who uses it now."""
    root = d.record.get("root")
    where = f"{root} (sharded from {d.record.get('source')})" if root else "root not recorded"
    total = d.record.get("shards")
    shards = f"{d.shards} of {total} shards" if total else f"{d.shards} shards"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.last_use)) if d.last_use else "never"
    pids = ", ".join(str(p) for p in d.users)
    state = (
        f"in use by {len(d.users)} process{'es' if len(d.users) > 1 else ''} (pid {pids})"
        if d.users
        else "not in use"
    )
    return f"{d.name}  {where}  {shards}  {size_text(d.bytes)}  last used {when}  {state}"


@dataclass
class PruneResult:
    removed: list[CachedDataset]  # (or, in a dry run, would be)
    busy: list[CachedDataset]  # not named by keep, but a live process uses it: left alone
    kept: list[CachedDataset]
    leftovers: list[Path]  # hidden folders of an earlier prune that did not finish
    freed: int  # bytes


def prune(root: Path, keep: dict[str, str], dry_run: bool = False) -> PruneResult:
    """Remove every dataset folder of ``root`` not in ``keep`` (folder name -> root) and used by
    no live process, as the ledger says under its lock (see the module docstring)."""
    leftovers = sorted(p for p in root.iterdir() if p.name.startswith(PRUNING_PREFIX) and p.is_dir())
    removed, busy, kept, doomed = [], [], [], []
    with Ledger(root).entries() as entries:
        users = _users(entries)
        for path in _dataset_folders(root):
            d = _folder(path)
            d.users = users.get(d.name, [])
            if d.name in keep:
                kept.append(d)
            elif d.users:
                busy.append(d)
            else:
                removed.append(d)
                if not dry_run:
                    hidden = root / f"{PRUNING_PREFIX}{d.name}.{os.getpid()}.{time.time_ns()}"
                    path.rename(hidden)
                    doomed.append(hidden)
    freed = sum(d.bytes for d in removed) + sum(_tree_bytes(p) for p in leftovers)
    if not dry_run:
        for path in doomed:
            shutil.rmtree(path)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)  # another prune may be deleting it too
    return PruneResult(removed, busy, kept, leftovers, freed)
