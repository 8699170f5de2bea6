"""``python -m pipeline data stats``: the training set's mean, for ``data.normalize: mean``.

    python -m pipeline data stats /data/imagenet                  # per-pixel mean image at 224x224
    python -m pipeline data stats /data/imagenet --per-channel    # three numbers instead
    python -m pipeline data stats /data/imagenet --limit 50000    # a seeded sample of the images

Each training image is decoded, resized to shorter side ``crop_size`` and centre-cropped to
``crop_size`` x ``crop_size`` (the network's input size), and the views are averaged pixel by
pixel, in float64, together with their mirror images: training flips half the crops, so the
mean of what the network sees is left-right symmetric, and a symmetric mean can be subtracted
before or after the flip alike. ``--per-channel`` keeps only the three channel means of that
image. The result is written beside the data as ``ROOT/train_mean.npz``, which training reads
(``pipeline.data.stats``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.data.layout import DataLayoutError
from pipeline.data.stats import KINDS, MEAN_FILE, MeanStats, mean_path
from pipeline.store import locations


def write_mean(root: str | Path, stats: MeanStats) -> Path:
    """Store ``stats`` as ``ROOT/train_mean.npz``."""
    if stats.kind not in KINDS:
        raise ValueError(f"mean kind {stats.kind!r}; choose one of {KINDS}")
    path = mean_path(root)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        kind=np.array(stats.kind),
        mean=stats.mean.astype(np.float32),
        crop_size=np.array(stats.crop_size),
        images=np.array(stats.images),
    )
    locations.write_bytes(path, buffer.getvalue())
    return path


def compute_mean(
    files: list[str],
    crop_size: int,
    *,
    per_channel: bool = False,
    num_threads: int = 1,
    batch_size: int = 64,
) -> MeanStats:
    """Average ``files`` at ``crop_size`` (shorter side resized, centre crop, mirrored too).

    Args:
        files: training image paths.
        crop_size: side of the mean image (the network's input size, ``data.crop_size``).
        per_channel: keep three channel means instead of the image.
        num_threads: DALI CPU decoding threads.
        batch_size: images per DALI batch.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    from pipeline.data.dali_eval import crop_windows, cut, resize_like_torchvision

    if not files:
        raise DataLayoutError("no training images to average")
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=None, seed=0)
    with pipe:
        jpegs, _ = fn.readers.file(
            files=list(files), random_shuffle=False, pad_last_batch=True, name="Reader"
        )
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        # torchvision's Resize(crop) + CenterCrop(crop), to the pixel, like the centre test view
        images, height, width = resize_like_torchvision(images, jpegs, crop_size)
        ((top, left, _),) = crop_windows("center", height, width, crop_size)
        pipe.set_outputs(cut(images, top, left, crop_size))
    pipe.build()
    total = np.zeros((crop_size, crop_size, 3), np.float64)
    seen = 0
    while seen < len(files):
        (batch,) = pipe.run()
        n = min(batch_size, len(files) - seen)  # the reader pads the last batch
        total += np.stack([np.asarray(batch[i], dtype=np.float64) for i in range(n)]).sum(axis=0)
        seen += n
    image = total / seen
    image = (image + image[:, ::-1]) / 2  # the mean of the crops and of their flips
    mean = image.mean(axis=(0, 1)) if per_channel else image
    return MeanStats("channel" if per_channel else "pixel", mean.astype(np.float32), crop_size, seen)


def dataset_mean(
    root: str | Path,
    crop_size: int,
    *,
    per_channel: bool = False,
    limit: int = 0,
    seed: int = 0,
    num_threads: int = 1,
) -> MeanStats:
    """The mean of an ImageNet-layout training set (all of it, or ``limit`` images drawn with ``seed``)."""
    from pipeline.data.layout import scan_imagenet

    files = list(scan_imagenet(root).train_files)
    if limit and limit < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in pick]
    return compute_mean(files, crop_size, per_channel=per_channel, num_threads=num_threads)


# ---------------------------------------------------------------- `python -m pipeline data stats`


def add_stats_command(sub) -> None:
    """The ``stats`` subcommand's arguments (``sub``: the data command's subparsers)."""
    from pipeline.data.constants import CROP_SIZE

    t = sub.add_parser("stats", help=f"the training set's mean for data.normalize=mean (ROOT/{MEAN_FILE})")
    t.add_argument("root", help="an ImageNet-layout dataset (ROOT/train/<class>/...), a folder or a URI")
    t.add_argument(
        "--crop-size", type=int, default=CROP_SIZE, help="data.crop_size of the runs (default 224)"
    )
    t.add_argument("--per-channel", action="store_true", help="store three channel means, not the mean image")
    t.add_argument("--limit", type=int, default=0, help="average this many images drawn at random (0: all)")
    t.add_argument("--seed", type=int, default=0, help="with --limit: which images")
    t.add_argument("--workers", type=int, default=0, help="decoding threads (0: all CPUs)")


def stats_command(args) -> int:
    """Compute and store the mean; prints what it wrote."""
    import time

    from pipeline.host import usable_cpus

    if args.crop_size < 1 or args.limit < 0:
        raise ValueError(
            f"--crop-size must be positive and --limit >= 0 (got {args.crop_size}, {args.limit})"
        )
    start = time.perf_counter()
    stats = dataset_mean(
        args.root,
        args.crop_size,
        per_channel=args.per_channel,
        limit=args.limit,
        seed=args.seed,
        num_threads=args.workers or usable_cpus(),
    )
    path = write_mean(args.root, stats)
    r, g, b = stats.channel_mean
    print(
        f"wrote {path}: {stats.kind} mean at {stats.crop_size}x{stats.crop_size} of {stats.images} training images "
        f"(channel means R {r:.2f} G {g:.2f} B {b:.2f}) in {time.perf_counter() - start:.1f}s"
    )
    return 0
