"""``python -m pipeline data cache ls|prune``: what a node's shard cache holds, and removing what no job needs.

    python -m pipeline data cache ls [--cache-dir DIR]
    python -m pipeline data cache prune [--cache-dir DIR] [--keep ROOT ...] [--dry-run]

DIR defaults to ``data.cache_dir``'s default (``<system temp dir>/resnet-pipeline-shards``); the
templates put it at ``/mnt/shard-cache``. ``--keep ROOT`` names a dataset as ``data.root`` does;
its manifest is read to find its folder, the same way the cache names it. A dataset that a live
process uses (the folder's ledger says so, under its lock) is never removed, nor a shard that a
kept or used dataset names (shards are named by content, so two datasets may name one file: it
is counted once, and removed only with the last dataset naming it).

Exit status: 0 done; 1 (prune) a dataset not kept was left because a running job uses it;
2 a cache folder that does not exist, or a ``--keep`` root that is not a sharded dataset.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class CacheCommandError(ValueError):
    """Bad input to a cache command; the message names it (exit status 2)."""


def add_cache_command(sub) -> None:
    c = sub.add_parser("cache", help="list or prune the datasets in a node's shard cache (data.cache_dir)")
    actions = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="one line per cached dataset: root, shards, size, last use, users")
    pr = actions.add_parser("prune", help="remove the cached datasets not named by --keep and not in use")
    for p in (ls, pr):
        p.add_argument(
            "--cache-dir", metavar="DIR", help="the cache folder (default: data.cache_dir's default)"
        )
    pr.add_argument(
        "--keep",
        nargs="+",
        action="extend",
        default=[],
        metavar="ROOT",
        help="datasets to keep, as data.root names them",
    )
    pr.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def _cache_root(setting: str | None) -> Path:
    from pipeline.data.shard_cache import default_cache_dir

    root = Path(setting or default_cache_dir()).expanduser()
    if not root.is_dir():
        how = "--cache-dir" if setting else "data.cache_dir's default; pass --cache-dir DIR"
        raise CacheCommandError(f"cache folder {root} does not exist ({how})")
    return root


def _keep_folders(roots: list[str]) -> dict[str, str]:
    """Each ``--keep`` root's cache folder (the first 16 hex digits of its manifest's SHA-256)."""
    from pipeline.data.shard_manifest import ShardError, load_manifest

    folders = {}
    for root in roots:
        try:
            manifest = load_manifest(root)
        except ShardError as e:
            raise CacheCommandError(f"--keep {root}: {e}") from None
        if manifest is None:
            raise CacheCommandError(
                f"--keep {root}: unknown dataset root: no manifest.json.gz there (a sharded data.root holds one)"
            )
        folders[manifest.digest[:16]] = root
    return folders


def _ls(args: argparse.Namespace) -> int:
    from pipeline.data.cache_folders import describe, scan, size_text

    root = _cache_root(args.cache_dir)
    contents = scan(root)
    found = contents.datasets
    print(f"{root}: {len(found)} cached dataset{'s' if len(found) != 1 else ''}, {size_text(contents.total)}")
    for d in found:
        print(describe(d))
    if contents.unnamed:
        size = sum(b for b, _ in contents.unnamed.values())
        print(f"{len(contents.unnamed)} shards named by no dataset, {size_text(size)} (a prune removes them)")
    return 0


def _root(d) -> str:
    return d.record.get("root", "root not recorded")


def _prune(args: argparse.Namespace) -> int:
    from pipeline.data.cache_folders import prune, size_text

    root = _cache_root(args.cache_dir)
    keep = _keep_folders(args.keep)
    result = prune(root, keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for d in result.kept:
        print(f"kept {d.name}: {keep[d.name]}, {size_text(d.bytes)}")
    cached = {d.name for d in result.kept}
    for folder, kept_root in keep.items():
        if folder not in cached:
            print(f"kept {folder}: {kept_root} is not in this cache (nothing to keep)")
    for d in result.busy:
        pids = ", ".join(str(p) for p in d.users)
        print(f"refused {d.name}: {_root(d)} is in use by a running job (pid {pids})")
    for d in result.removed:
        stay = result.kept_by[d.name]
        shared = f" ({size_text(stay)} of shards a kept or running dataset names stay)" if stay else ""
        print(f"{verb} {d.name}: {_root(d)}, {d.shards} shards, {size_text(result.freed_by[d.name])}{shared}")
    if result.unnamed:
        print(f"{verb} shards named by no dataset: {size_text(result.unnamed)}")
    if result.stale:
        print(
            f"{verb} {result.stale} files of kept datasets in the layout before shards were named by content"
        )
    for path in result.leftovers:
        print(f"{verb} {path.name}: left by a prune that did not finish")
    print(
        f"{root}: {verb} {len(result.removed)} dataset(s), freed {result.freed} bytes ({size_text(result.freed)})"
    )
    return 1 if result.busy else 0


def cache_command(args: argparse.Namespace) -> int:
    return {"ls": _ls, "prune": _prune}[args.action](args)
