"""``python -m pipeline data <command>``: dataset tools.

    python -m pipeline data synth --out data/synth --classes 10 --train-per-class 100 --val-per-class 20
    python -m pipeline data synth-cifar --out data/cifar-synth
    python -m pipeline data check-layout /data/imagenet        # or s3://bucket/imagenet
    python -m pipeline data index s3://bucket/imagenet         # write ROOT/pipeline-index.json.gz
    python -m pipeline data verify /data/imagenet [--fix] [--json] [--workers N]
    python -m pipeline data prepare-val --val /data/imagenet/val --labels LOC_val_solution.csv [--undo]
    python -m pipeline data stats /data/imagenet [--per-channel] [--crop-size 224] [--limit N]
    python -m pipeline data shard /data/imagenet s3://bucket/imagenet-shards [--shard-size-mb 128]
    python -m pipeline data cache ls|prune [--cache-dir DIR] [--keep ROOT ...] [--dry-run]

Exit status: 0 success, 1 problems found (verify) or a dataset left in use (cache prune), 2 bad input
or layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.data.cache_cli import add_cache_command, cache_command
from pipeline.data.prep.mean import add_stats_command, stats_command
from pipeline.data.prep.shard_cli import add_shard_command, shard_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline data", description="dataset tools")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a small synthetic ImageNet-layout dataset (real JPEGs)")
    s.add_argument(
        "--out", required=True, type=Path, help="destination folder (new, empty, or an earlier synth)"
    )
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--train-per-class", type=int, default=100)
    s.add_argument("--val-per-class", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="processes (0: all CPUs)")
    s.add_argument(
        "--force", action="store_true", help="replace an earlier synthetic dataset with other settings"
    )

    c = sub.add_parser("synth-cifar", help="write a synthetic CIFAR-10 archive in the real python format")
    c.add_argument(
        "--out", required=True, type=Path, help="dataset root; files go to OUT/cifar-10-batches-py/"
    )
    c.add_argument("--train-per-class", type=int, default=500)
    c.add_argument("--test-per-class", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)

    k = sub.add_parser(
        "check-layout",
        help="list ROOT/train/<class>/ and ROOT/val/<class>/ (local or s3://, gs://), count images, "
        "and compare the index file when there is one; a sharded ROOT (`data shard`): read its manifest "
        "and check that every shard it names is there at its size",
    )
    k.add_argument("root", help="dataset folder or URI")

    i = sub.add_parser(
        "index",
        help="list ROOT once and write ROOT/pipeline-index.json.gz, which training then reads "
        "instead of listing every image",
    )
    i.add_argument("root", help="dataset folder or URI (s3://bucket/prefix)")

    v = sub.add_parser("verify", help="decode-check every image; --fix repairs or quarantines bad ones")
    v.add_argument("root", type=Path)
    v.add_argument(
        "--fix", action="store_true", help="rewrite PNG/CMYK/grey as RGB JPEG; quarantine unreadable files"
    )
    v.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    v.add_argument("--workers", type=int, default=0, help="processes (0: all CPUs)")

    r = sub.add_parser("prepare-val", help="sort the flat ImageNet val folder into class folders")
    r.add_argument("--val", required=True, type=Path, help="the folder of ILSVRC2012_val_*.JPEG files")
    r.add_argument(
        "--labels",
        type=Path,
        help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt (needs --synsets)",
    )
    r.add_argument(
        "--synsets",
        type=Path,
        help="synset order for ground_truth.txt's 1-based ids: LOC_synset_mapping.txt or one wnid per line "
        "in the devkit (meta.mat) order",
    )
    r.add_argument(
        "--undo", action="store_true", help="move the files back, using the manifest written before"
    )
    r.add_argument("--dry-run", action="store_true", help="check and count, move nothing")
    add_stats_command(sub)
    add_shard_command(sub)
    add_cache_command(sub)
    return p


def _synth(args: argparse.Namespace) -> int:
    from pipeline.data.prep.synth import write_synthetic_imagenet

    summary = write_synthetic_imagenet(
        args.out,
        args.classes,
        args.train_per_class,
        args.val_per_class,
        args.seed,
        workers=args.workers or None,
        force=args.force,
    )
    if summary["up_to_date"]:
        print(f"{summary['out']}: already holds this synthetic dataset; nothing to do")
    else:
        print(
            f"wrote {summary['train']} train + {summary['val']} val images ({args.classes} classes, "
            f"{summary['bytes'] / 1e6:.1f} MB) to {summary['out']} in {summary['seconds']:.1f}s"
        )
    return 0


def _synth_cifar(args: argparse.Namespace) -> int:
    from pipeline.data.prep.synth_cifar import write_synthetic_cifar

    out = write_synthetic_cifar(args.out, args.train_per_class, args.test_per_class, args.seed)
    print(
        f"wrote a synthetic CIFAR-10 archive ({args.train_per_class * 10} train, {args.test_per_class * 10} test) to {out}"
    )
    return 0


def _counts(index: Any) -> str:
    return f"{len(index.classes)} classes, {len(index.train_files)} train images, {len(index.val_files)} val images"


def _check_sharded(root: str) -> bool:
    """A sharded ROOT checked (its manifest read, every shard there at its size); False: not sharded."""
    from pipeline.data.shard_manifest import check_shards, load_manifest

    manifest = load_manifest(root)
    if manifest is None:
        return False
    check_shards(manifest)
    counts = ", ".join(
        f"{len(manifest.split(s))} {s} images in {len(manifest.shard_ids(s))} shards ({manifest.bytes_of(s):,} bytes)"
        for s in sorted(manifest.splits)
    )
    print(f"{root}: sharded (manifest {manifest.digest[:16]}): {manifest.num_classes} classes, {counts}")
    return True


def _check_layout(args: argparse.Namespace) -> int:
    from pipeline.data.layout import DataLayoutError, compare_index, index_location, load_index, scan_imagenet

    if _check_sharded(args.root):
        return 0

    # Everything is listed here, whatever the index says: this is the thorough check.
    scanned = scan_imagenet(args.root, use_index=False)
    print(f"{args.root}: {_counts(scanned)}")
    indexed = load_index(args.root)
    if indexed is None:
        print(
            f"no index at {index_location(args.root)} (write one with `python -m pipeline data index {args.root}`)"
        )
        return 0
    diff = compare_index(scanned, indexed)
    if diff:
        raise DataLayoutError(
            f"{indexed.index_file}: stale index: {diff}; rebuild it with `python -m pipeline data index {args.root}`"
        )
    print(f"index {indexed.index_file}: up to date")
    return 0


def _index(args: argparse.Namespace) -> int:
    from pipeline.data.layout import write_index

    start = time.perf_counter()
    path, index, size = write_index(args.root)
    print(f"{args.root}: {_counts(index)}")
    print(f"wrote {path} ({size / 1e6:.2f} MB) in {time.perf_counter() - start:.1f}s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.data.prep.verify import verify_images

    report = verify_images(args.root, fix=args.fix, workers=args.workers or None)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            print(f"{problem.path}: {problem.reason}" + (f" -> {problem.action}" if problem.action else ""))
        print(report.summary(), file=sys.stderr)
    return 1 if report.remaining else 0


def _prepare_val(args: argparse.Namespace) -> int:
    from pipeline.data.prep.verify import prepare_val, undo_prepare_val

    if args.undo:
        n = undo_prepare_val(args.val)
        print(f"{args.val}: moved {n} images back to the flat layout")
        return 0
    if args.labels is None:
        print(
            "error: prepare-val needs --labels (LOC_val_solution.csv or the devkit ground truth)",
            file=sys.stderr,
        )
        return 2
    n, classes = prepare_val(args.val, args.labels, synsets=args.synsets, dry_run=args.dry_run)
    verb = "would move" if args.dry_run else "moved"
    print(f"{args.val}: {verb} {n} images into {classes} class folders")
    return 0


COMMANDS = {
    "synth": _synth,
    "synth-cifar": _synth_cifar,
    "check-layout": _check_layout,
    "index": _index,
    "verify": _verify,
    "prepare-val": _prepare_val,
    "stats": stats_command,
    "shard": shard_command,
    "cache": cache_command,
}


def main(argv: list[str]) -> int:
    """Run one data command; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as e:
        # DataLayoutError is a ValueError; every message here names the path and the fix.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
