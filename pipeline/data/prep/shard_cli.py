"""``python -m pipeline data shard SRC OUT``: the argument parser and the command (pipeline.data.prep.shard_writer writes)."""

from __future__ import annotations

import argparse


def add_shard_command(sub) -> None:
    s = sub.add_parser(
        "shard",
        help="write an ImageNet tree as WebDataset tar shards + manifest.json.gz (local or s3://, gs://); "
        "train with data.root=OUT",
    )
    s.add_argument("src", help="ImageNet-layout root (local or URI), checked like check-layout")
    s.add_argument("out", help="destination folder or bucket prefix")
    s.add_argument("--shard-size-mb", type=float, default=128, help="target shard size (default 128)")
    s.add_argument("--seed", type=int, default=0, help="shuffle of the training samples across shards")
    s.add_argument("--workers", type=int, default=0, help="processes (0: every usable CPU)")
    s.add_argument("--force", action="store_true", help="replace shards of another source or settings in OUT")


def shard_command(args: argparse.Namespace) -> int:
    from pipeline.data.prep.shard_writer import write_shards

    summary = write_shards(
        args.src, args.out, shard_size_mb=args.shard_size_mb, seed=args.seed, workers=args.workers or None,
        force=args.force,
    )  # fmt: skip
    if summary["written"] == 0:
        print(f"{summary['out']}: all {summary['shards']} shards present and intact; manifest up to date")
    else:
        per_100k = 1e5 / summary["images_per_s"] if summary["images_per_s"] else 0.0
        print(
            f"wrote {summary['written']} of {summary['shards']} shards ({summary['images']} images, "
            f"{summary['bytes'] / 1e6:.1f} MB) to {summary['out']} in {summary['seconds']:.1f}s with "
            f"{summary['workers']} processes: {summary['images_per_s']:.0f} img/s, {per_100k:.0f}s per 100,000 images"
        )
    return 0
