"""The datasets a node's shard cache folder holds, and removing what no job needs.

    for found in scan(Path("/mnt/shard-cache")):          # one per dataset folder
        print(describe(found))
    result = prune(Path("/mnt/shard-cache"), keep={"3f2a9c1d0b4e5f67": "s3://bucket/imagenet-shards"})

The folder (``data.cache_dir``) holds the shards, named by their content, in ``shards/``
(``<sha256>.tar``: a shard two manifests name, for instance after ``data shard`` was run again with
a newer version, is one file, fetched once); one sub-folder per dataset, named by the first 16 hex
digits of its manifest's SHA-256, that holds only ``dataset.json``; and ``ledger.json``, where every
live process using the folder has an entry naming its dataset (``pipeline.data.cache_ledger``). Each
cache handle writes ``dataset.json`` when it opens (under the ledger's lock) and touches it when it
closes: the dataset's root and source as the manifest names them, its number of shards and bytes,
the SHA-256 of each shard, and, by the file's time, its last use. So ``ls`` counts a dataset's bytes
from the shards it names, and the folder's total counts each file once.

A prune decides under the ledger's lock: it removes each dataset folder that ``keep`` does not name
and no live entry names (renamed to a hidden name, deleted after the lock is let go), then every
shard that no remaining dataset names (each under its shard lock: one being fetched stays). A cache
handle registers under the same lock and makes its folder again if it is gone, so a job that starts
during a prune finds its folder rather than a half-deleted one, and fetches again any shard removed.
A prune killed midway leaves hidden folders that the next prune deletes. Folders of the layout
before shards were named by content (``<16 hex>/<shard>.tar``) are listed and pruned the same way;
their shards are no longer read, so a prune removes them from kept folders too, and eviction takes
them first.
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
from pipeline.data.cache_shards import SHARDS_FOLDER, delete_unlocked, named_shards, shard_files

RECORD_NAME = "dataset.json"
# A dataset folder's name, as the cache makes it: nothing else under the folder is listed or
# removed, so a --cache-dir pointed at the wrong place (/tmp, say) removes nothing of others'.
DATASET_FOLDER = re.compile(r"[0-9a-f]{16}")
PRUNING_PREFIX = ".pruning-"  # a folder being deleted by a prune
DIR_MODE = 0o775  # the folders a cache makes (shard_cache imports it): the group may fetch into them too
RECORD_MODE = 0o664


def record_use(folder: Path, manifest: Any) -> None:
    """Write ``folder/dataset.json`` for ``manifest`` (the folder made if a prune took it): what
    the dataset names in the cache; its time is the dataset's last use. A prune reads the shards
    a dataset names from it, so a failure to write it is an error."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, DIR_MODE)
    doc = {
        "root": manifest.root,
        "source": manifest.source,
        "digest": manifest.digest,
        "shards": len(manifest.shards),
        "bytes": sum(s.size for s in manifest.shards),
        "sha256s": [s.sha256 for s in manifest.shards],
    }
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RECORD_NAME}.")
    with os.fdopen(fd, "w") as out:
        json.dump(doc, out)
    os.chmod(tmp, RECORD_MODE)
    os.replace(tmp, folder / RECORD_NAME)


def touch_record(folder: Path) -> None:
    """The dataset was used until now (a cache handle closed)."""
    try:
        os.utime(folder / RECORD_NAME)
    except OSError:
        pass


def read_record(folder: Path) -> dict[str, Any]:
    """``folder/dataset.json``, or {} for a folder written before it existed (or a torn one)."""
    try:
        return json.loads((folder / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class CachedDataset:
    """One dataset of a cache, as ``ls`` shows it."""

    name: str  # the folder: the first 16 hex digits of the manifest's SHA-256
    path: Path
    record: dict[str, Any]  # dataset.json ({} for a folder written before it existed)
    shards: int  # its shards that are cached
    bytes: int  # those shards' bytes and its folder's files
    shared: int  # of those, the bytes of shards another dataset of the cache names too
    last_use: float  # the newest file time in its folder (seconds since the epoch)
    users: list[int] = field(default_factory=list)  # pids of live processes using it (the ledger)
    names: set[str] = field(default_factory=set)  # the shard files it names (content-named layout)


def _folder(path: Path, cached: dict[str, tuple[int, float]]) -> CachedDataset:
    """A dataset folder: its own files (its record; tars too in the layout before content names)
    and the cached shards its record names."""
    shards, size, newest = 0, 0, 0.0
    for f in os.scandir(path):
        try:
            st = f.stat(follow_symlinks=False)
        except FileNotFoundError:  # evicted meanwhile
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime)
        shards += f.name.endswith(".tar") and not f.name.startswith(".")
    record = read_record(path)
    names = named_shards(record)
    present = names & cached.keys()
    size += sum(cached[n][0] for n in present)
    return CachedDataset(path.name, path, record, shards + len(present), size, 0, newest, names=names)


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


@dataclass
class CacheContents:
    datasets: list[CachedDataset]
    total: int  # every byte once: the datasets' folders and every cached shard
    unnamed: dict[str, tuple[int, float]]  # cached shards no dataset names (a prune removes them)


def _contents(root: Path, users: dict[str, list[int]]) -> CacheContents:
    cached = shard_files(root)
    found = [_folder(p, cached) for p in _dataset_folders(root)]
    for d in found:
        d.users = users.get(d.name, [])
        others = set().union(*(o.names for o in found if o is not d))
        d.shared = sum(cached[n][0] for n in d.names & others & cached.keys())
    named = set().union(*(d.names for d in found))
    unnamed = {n: v for n, v in cached.items() if n not in named}
    own = sum(d.bytes - sum(cached[n][0] for n in d.names & cached.keys()) for d in found)
    return CacheContents(found, own + sum(size for size, _ in cached.values()), unnamed)


def scan(root: Path) -> CacheContents:
    """Every dataset of the cache at ``root``, with the live processes using each."""
    return _contents(root, _users(live_entries(root)))


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def describe(d: CachedDataset) -> str:
    """One line: folder, root (and source), shards, size, last use, and who uses it now."""
    root = d.record.get("root")
    where = f"{root} (sharded from {d.record.get('source')})" if root else "root not recorded"
    total = d.record.get("shards")
    shards = f"{d.shards} of {total} shards" if total else f"{d.shards} shards"
    shared = f" ({size_text(d.shared)} shared with other datasets)" if d.shared else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.last_use)) if d.last_use else "never"
    pids = ", ".join(str(p) for p in d.users)
    state = (
        f"in use by {len(d.users)} process{'es' if len(d.users) > 1 else ''} (pid {pids})"
        if d.users
        else "not in use"
    )
    return f"{d.name}  {where}  {shards}  {size_text(d.bytes)}{shared}  last used {when}  {state}"


@dataclass
class PruneResult:
    removed: list[CachedDataset]  # (or, in a dry run, would be)
    busy: list[CachedDataset]  # not named by keep, but a live process uses it: left alone
    kept: list[CachedDataset]
    leftovers: list[Path]  # hidden folders of an earlier prune that did not finish
    freed: int  # bytes
    freed_by: dict[str, int] = field(default_factory=dict)  # removed dataset -> bytes freed with it
    kept_by: dict[str, int] = field(default_factory=dict)  # removed dataset -> its shards' bytes that stay
    unnamed: int = 0  # shards no dataset named, removed
    stale: int = 0  # shards of the layout before content names, removed from kept folders


def _stale_files(d: CachedDataset) -> list[Path]:
    """A dataset folder's shards of the layout before content names: no cache reads them now."""
    return [
        p for p in d.path.iterdir() if p.name.endswith((".tar", ".tar.ok")) and not p.name.startswith(".")
    ]


def prune(root: Path, keep: dict[str, str], dry_run: bool = False) -> PruneResult:
    """Remove every dataset folder of ``root`` not in ``keep`` (folder name -> root) and used by
    no live process, then every cached shard no remaining dataset names, deciding under the
    ledger's lock (see the module docstring)."""
    leftovers = sorted(p for p in root.iterdir() if p.name.startswith(PRUNING_PREFIX) and p.is_dir())
    removed, busy, kept, doomed, freed_by, kept_by = [], [], [], [], {}, {}
    with Ledger(root).entries() as entries:
        contents = _contents(root, _users(entries))
        cached = shard_files(root)
        for d in contents.datasets:
            (kept if d.name in keep else busy if d.users else removed).append(d)
        needed = set().union(*(d.names for d in kept + busy))
        counted: set[str] = set()
        for d in removed:  # a shard two removed datasets name is counted with the first
            mine = d.names & cached.keys()
            gone = mine - needed - counted
            counted |= gone
            freed_by[d.name] = d.bytes - sum(cached[n][0] for n in mine - gone)
            kept_by[d.name] = sum(cached[n][0] for n in mine & needed)
            if not dry_run:
                hidden = root / f"{PRUNING_PREFIX}{d.name}.{os.getpid()}.{time.time_ns()}"
                d.path.rename(hidden)
                doomed.append(hidden)
        unnamed = sum(size for n, (size, _) in cached.items() if n not in needed and n not in counted)
        stale = [p for d in kept if not d.users for p in _stale_files(d)]
        stale_bytes = sum(p.stat().st_size for p in stale)
        if not dry_run:
            for n in cached.keys() - needed:
                delete_unlocked(root / SHARDS_FOLDER / n)
            for p in stale:
                p.unlink(missing_ok=True)
    freed = sum(freed_by.values()) + unnamed + stale_bytes + sum(_tree_bytes(p) for p in leftovers)
    if not dry_run:
        for path in doomed:
            shutil.rmtree(path)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)  # another prune may be deleting it too
    return PruneResult(removed, busy, kept, leftovers, freed, freed_by, kept_by, unnamed, len(stale))
