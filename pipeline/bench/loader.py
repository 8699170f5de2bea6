"""``python -m pipeline bench loader``: DALI against a torchvision DataLoader on the same JPEGs.

    python -m pipeline bench loader --data data/synth-bench --json
    python -m pipeline bench loader --data /data/imagenet --threads 8 --images 20000

Train: our DALI pipeline with the paper's augmentation (shorter side random in
[scale-min, scale-max], random crop-size crop, flip, PCA lighting folded into the normaliser)
against ``ImageFolder`` + ``DataLoader`` with the same augmentation written the usual
torchvision way (``RandomResize`` to a shorter side in the same range, ``RandomCrop``,
``RandomHorizontalFlip``, to tensor, ``Normalize``). Val: the 10-crop test on both sides
(shorter side val-resize, four corners and centre and their flips).

Equal resources: DALI gets ``--threads`` CPU threads, the DataLoader as many worker processes
(default: every CPU this process may use). Both read the same files: the dataset's files are
cycled to ``--images`` per timed pass, so a small set still gives a long steady stream.

``img_per_s`` counts images (a 10-crop image is one image) over the last three quarters of
the pass, so it is the steady rate a long epoch sees; the pipeline's start-up (DALI build,
worker start) is reported beside it as ``startup_s``. DALI and torchvision passes alternate,
``--repeats`` times each, and the median pass is the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.common import BenchError, finish_machine, machine_info, median, ratio
from pipeline.host import usable_cpus

HELP = "DALI train / 10-crop val pipelines vs a torchvision DataLoader at equal threads (images/s)"


# ---------------------------------------------------------------- torchvision's side


class StackCrops:
    """TenCrop's tuple of PIL crops -> one normalised [10, 3, h, w] tensor.

    A class rather than a lambda so DataLoader workers can receive it under any start method.
    """

    def __init__(self) -> None:
        from torchvision.transforms import v2

        from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD

        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.normalize = v2.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD])

    def __call__(self, crops: Iterable[Any]) -> torch.Tensor:
        return torch.stack([self.normalize(self.to_tensor(c)) for c in crops])


def torchvision_transform(
    mode: str, *, crop_size: int, scale_min: int, scale_max: int, val_resize: int
) -> Any:
    """The torchvision transform for ``mode`` "train" (the paper's augmentation) or "tencrop".

    Args:
        mode: "train" or "tencrop".
        crop_size: the square crop (224 in the paper).
        scale_min, scale_max: the training shorter side is uniform in [scale_min, scale_max].
        val_resize: the shorter side before the ten crops (256 in the paper).
    """
    from torchvision.transforms import v2

    from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD

    if mode == "tencrop":
        return v2.Compose([v2.Resize(val_resize), v2.TenCrop(crop_size), StackCrops()])
    return v2.Compose(
        [
            v2.RandomResize(scale_min, scale_max + 1),  # [min, max) there; the paper's range is inclusive
            v2.RandomCrop(crop_size),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
        ]
    )


def torchvision_batches(
    split_dir: Path, transform: Any, *, images: int, batch_size: int, workers: int, train: bool
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader over ``split_dir`` (ImageFolder), the files cycled to ``images`` samples.

    Args:
        split_dir: ``root/train`` or ``root/val``.
        transform: the per-image transform.
        images: samples in the pass.
        batch_size: samples per batch.
        workers: worker processes.
        train: shuffle and drop the last partial batch (as the DALI train loader does).
    """
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(split_dir), transform=transform)
    cycled = Subset(dataset, [i % len(dataset) for i in range(images)])
    return DataLoader(cycled, batch_size=batch_size, shuffle=train, num_workers=workers, drop_last=train)


# ---------------------------------------------------------------- DALI's side


def cycled(
    files: tuple[str, ...], labels: tuple[int, ...], n: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The first ``n`` of ``files`` repeated end to end, with their labels.

    Args:
        files, labels: one split of the index.
        n: how many to return.
    """
    if not files:
        raise BenchError("the split has no images")
    return tuple(files[i % len(files)] for i in range(n)), tuple(labels[i % len(files)] for i in range(n))


def dali_batches(
    index: Any, mode: str, data_cfg: Any, *, images: int, batch_size: int, threads: int, seed: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of our DALI train ("paper") or 10-crop val pipeline on CPU over ``images`` samples.

    Args:
        index: the scanned dataset (``scan_imagenet``).
        mode: "train" or "tencrop".
        data_cfg: the ``DataConfig`` with the sizes.
        images: samples in the pass (the split's files cycled).
        batch_size: samples per batch.
        threads: DALI CPU threads.
        seed: the pipeline's seed (file order and augmentation).
    """
    from pipeline.data.imagenet import build_train_loader, build_val_loader
    from pipeline.data.layout import ImageFolderIndex

    train_files, train_labels = cycled(index.train_files, index.train_labels, images)
    val_files, val_labels = cycled(index.val_files, index.val_labels, images)
    stream = ImageFolderIndex(index.classes, train_files, train_labels, val_files, val_labels)
    common = dict(rank=0, world_size=1, device_id=None, num_threads=threads)
    if mode == "train":
        return build_train_loader(stream, data_cfg, global_batch=batch_size, seed=seed, **common).epoch(0)
    return build_val_loader(
        stream, data_cfg, mode="tencrop", scales=(), batch_size=batch_size, **common
    ).epoch(0)


# ---------------------------------------------------------------- timing


def drain(make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    """Iterate one pass and time it.

    The steady rate skips the first quarter of the batches (at least one): while the first
    batch is being made, parallel workers and prefetch queues fill up, so the batches right
    after it arrive faster than the loader can sustain (with two DataLoader workers the second
    batch lands almost together with the first).

    Args:
        make_batches: builds the loader and returns its iterable (timed: it is the start-up).

    Returns:
        ``images``; ``img_per_s``, the steady rate; ``startup_s`` until the first batch;
        ``img_per_s_with_startup`` over the whole pass; ``wall_s``.
    """
    t0 = time.perf_counter()
    arrivals: list[tuple[float, int]] = []  # (time, images) per batch
    for _images, labels in make_batches():
        arrivals.append((time.perf_counter(), int(labels.shape[0])))
    end = time.perf_counter()
    if len(arrivals) < 2:
        raise BenchError("a timed pass needs at least two batches; raise --images or lower --batch-size")
    skip = max(1, len(arrivals) // 4)
    n = sum(k for _, k in arrivals)
    steady_images = sum(k for _, k in arrivals[skip:])
    return {
        "images": n,
        "batches": len(arrivals),
        "img_per_s": steady_images / (end - arrivals[skip - 1][0]),
        "startup_s": arrivals[0][0] - t0,
        "img_per_s_with_startup": n / (end - t0),
        "wall_s": end - t0,
    }


def compare(passes: dict[str, Callable[[int], Iterable[Any]]], repeats: int) -> dict[str, Any]:
    """Alternate the DALI and torchvision passes ``repeats`` times; the median pass of each is its figure.

    The order flips every repeat, so neither side always runs right after the other's
    worker processes exit or always meets the same phase of someone else's load.

    Args:
        passes: {"dali": ..., "torchvision": ...}; each builds a loader for a seed (the repeat index)
            and returns its batches.
        repeats: passes per side.
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in passes}
    names = list(passes)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(drain(functools.partial(passes[name], r)))
    dali = median([x["img_per_s"] for x in runs["dali"]])
    tv = median([x["img_per_s"] for x in runs["torchvision"]])
    return {
        "dali_img_per_s": dali,
        "torchvision_img_per_s": tv,
        "ratio": ratio(dali, tv),
        "dali_runs": runs["dali"],
        "torchvision_runs": runs["torchvision"],
    }


def epoch_boundary(
    index: Any, data_cfg: Any, *, images: int, batch_size: int, threads: int, repeats: int
) -> dict[str, Any]:
    """Seconds from the last training batch of an epoch to the first of the next, two ways.

    ``continuous``: the pipeline runs on across the boundary (how training runs now: it is
    built once and its feed goes straight into the next epoch, so the batch is prefetched).
    ``rebuilt``: a pipeline built anew for the epoch (how every epoch started before): decoder
    set-up and an empty prefetch queue to refill.
    """
    from pipeline.data.imagenet import build_train_loader
    from pipeline.data.layout import ImageFolderIndex

    files, labels = cycled(index.train_files, index.train_labels, images)
    stream = ImageFolderIndex(index.classes, files, labels, index.val_files, index.val_labels)
    common = dict(global_batch=batch_size, rank=0, world_size=1, device_id=None, num_threads=threads)
    continuous, rebuilt = [], []
    for r in range(repeats):
        loader = build_train_loader(stream, data_cfg, seed=r, **common)
        for _ in loader.epoch(0):
            pass
        t0 = time.perf_counter()
        next(iter(loader.epoch(1)))
        continuous.append(time.perf_counter() - t0)
        fresh = build_train_loader(stream, data_cfg, seed=r, **common)
        t0 = time.perf_counter()
        next(iter(fresh.epoch(1)))
        rebuilt.append(time.perf_counter() - t0)
    return {
        "continuous_s": median(continuous),
        "rebuilt_s": median(rebuilt),
        "continuous_runs": continuous,
        "rebuilt_runs": rebuilt,
    }


def mmap_both_ways(
    index: Any, data_cfg: Any, *, images: int, batch_size: int, threads: int, repeats: int
) -> dict[str, Any]:
    """The DALI training pass with files read by mmap and by plain reads (``data.mmap``), alternated."""
    runs: dict[str, list[float]] = {"mmap": [], "read": []}
    for r in range(repeats):
        for name in ("mmap", "read") if r % 2 == 0 else ("read", "mmap"):
            cfg = dataclasses.replace(data_cfg, mmap=name == "mmap")
            make = functools.partial(
                dali_batches,
                index,
                "train",
                cfg,
                images=images,
                batch_size=batch_size,
                threads=threads,
                seed=r,
            )
            runs[name].append(drain(make)["img_per_s"])
    return {"mmap_img_per_s": median(runs["mmap"]), "read_img_per_s": median(runs["read"]), "runs": runs}


# ---------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench loader`` options.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "--data", type=Path, required=True, help="ImageNet-layout folder with train/ and val/"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="DALI threads = DataLoader workers (0: usable CPUs)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (train and val)")
    parser.add_argument("--images", type=int, default=1280, help="train images per timed pass (files cycled)")
    parser.add_argument(
        "--val-images", type=int, default=320, help="10-crop val images per timed pass (0: skip)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per side; the median is reported"
    )
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument(
        "--next-crop",
        type=int,
        default=0,
        help="the epoch-boundary pass's next epoch at this crop (data.res_schedule)",
    )
    parser.add_argument("--scale-min", type=int, default=256, help="smallest training shorter side")
    parser.add_argument("--scale-max", type=int, default=480, help="largest training shorter side")
    parser.add_argument("--val-resize", type=int, default=256, help="shorter side before the ten crops")
    parser.add_argument(
        "--pca-std",
        type=float,
        default=0.1,
        help="DALI's PCA lighting std (the paper's 0.1; folded into the normaliser, so free); torchvision has none",
    )


def _check(args: argparse.Namespace) -> None:
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        raise BenchError(
            f"{args.data} needs train/ and val/ folders (ImageNet layout); make one with "
            f"`python -m pipeline data synth --out {args.data}`"
        )
    for flag in ("batch_size", "images", "repeats", "crop_size"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not max(args.crop_size, args.next_crop) <= args.scale_min <= args.scale_max:
        raise BenchError(
            f"need crop-size and next-crop <= scale-min <= scale-max, got {args.crop_size}, {args.next_crop}, "
            f"{args.scale_min}, {args.scale_max}"
        )
    if args.val_resize < args.crop_size:
        raise BenchError(f"--val-resize ({args.val_resize}) must be at least --crop-size ({args.crop_size})")
    if args.images < 2 * args.batch_size or 0 < args.val_images < 2 * args.batch_size:
        raise BenchError(
            "--images and --val-images must give at least two batches per pass (or 0 to skip val)"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the parsed arguments describe and return its JSON-able result.

    Args:
        args: parsed ``bench loader`` arguments.
    """
    _check(args)
    import nvidia.dali
    import torchvision

    from pipeline.config import DataConfig
    from pipeline.config.schema import ResolutionSchedule
    from pipeline.data.layout import scan_imagenet

    threads = args.threads or usable_cpus()
    sizes = dict(
        crop_size=args.crop_size,
        scale_min=args.scale_min,
        scale_max=args.scale_max,
        val_resize=args.val_resize,
    )
    data_cfg = DataConfig(augment="paper", pca_std=args.pca_std, decoder="cpu", **sizes)
    index = scan_imagenet(args.data)
    machine = machine_info()
    start = time.perf_counter()

    def side(mode: str, images: int) -> dict[str, Callable[[int], Iterable[Any]]]:
        split = args.data / ("train" if mode == "train" else "val")
        tv_transform = torchvision_transform(mode, **sizes)
        batch = args.batch_size

        def dali(seed: int) -> Iterable[Any]:
            return dali_batches(
                index, mode, data_cfg, images=images, batch_size=batch, threads=threads, seed=seed
            )

        def tv(_seed: int) -> Iterable[Any]:
            return torchvision_batches(
                split, tv_transform, images=images, batch_size=batch, workers=threads, train=mode == "train"
            )

        return {"dali": dali, "torchvision": tv}

    train = compare(side("train", args.images), args.repeats)
    val = compare(side("tencrop", args.val_images), args.repeats) if args.val_images > 0 else None
    dali_args = dict(images=args.images, batch_size=args.batch_size, threads=threads, repeats=args.repeats)
    # --next-crop: the next epoch at another size (data.res_schedule), from the same pipeline.
    ramp = ResolutionSchedule(args.next_crop, 0, 1, 1) if args.next_crop else ResolutionSchedule()
    boundary = epoch_boundary(index, dataclasses.replace(data_cfg, res_schedule=ramp), **dali_args)
    mmap = mmap_both_ways(index, data_cfg, **dali_args)
    return {
        "bench": "loader",
        "data": str(args.data),
        "train_files": len(index.train_files),
        "val_files": len(index.val_files),
        "threads": threads,
        "batch_size": args.batch_size,
        "images": args.images,
        "val_images": args.val_images,
        "repeats": args.repeats,
        "crop_size": args.crop_size,
        "next_crop": args.next_crop or args.crop_size,
        "scale": [args.scale_min, args.scale_max],
        "val_resize": args.val_resize,
        "pca_std": args.pca_std,
        **{k: train[k] for k in ("dali_img_per_s", "torchvision_img_per_s", "ratio")},
        "train": train,
        "val_tencrop": val,
        "epoch_boundary": boundary,
        "mmap": mmap,
        "dali": nvidia.dali.__version__,
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - start,
        "machine": finish_machine(machine),
    }


def format_text(result: dict[str, Any]) -> str:
    """A few aligned lines for a terminal.

    Args:
        result: what ``run`` returned.
    """
    lines = [
        f"loader on {result['data']}: {result['threads']} threads/workers, batch {result['batch_size']}, "
        f"crop {result['crop_size']}, load {result['machine']['load_avg_start']} -> {result['machine']['load_avg_end']}",
        f"{'pipeline':<12}{'DALI img/s':>12}{'torchvision img/s':>19}{'ratio':>8}",
    ]
    for name, part in (("train", result["train"]), ("val 10-crop", result["val_tencrop"])):
        if part:
            lines.append(
                f"{name:<12}{part['dali_img_per_s']:>12,.1f}{part['torchvision_img_per_s']:>19,.1f}{part['ratio']:>8.2f}"
            )
    if b := result.get("epoch_boundary"):
        lines.append(
            f"epoch boundary (last batch -> first of the next, crop {result['crop_size']} -> "
            f"{result.get('next_crop', result['crop_size'])}): pipeline running on {b['continuous_s'] * 1e3:.1f} ms, "
            f"built anew {b['rebuilt_s'] * 1e3:.1f} ms"
        )
    if m := result.get("mmap"):
        lines.append(
            f"train reads: mmap {m['mmap_img_per_s']:.1f} img/s, plain reads {m['read_img_per_s']:.1f} img/s"
        )
    return "\n".join(lines)
