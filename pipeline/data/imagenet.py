"""ImageNet-layout loaders: this rank's batches from the DALI graphs, as torch tensors.

    index = scan_imagenet(cfg.data.root)
    train = build_train_loader(index, cfg.data, global_batch=256, rank=rank, world_size=world,
                               device_id=local_gpu_or_None, seed=cfg.seed, num_threads=4)
    for images, labels in train.epoch(epoch): ...
    val = build_val_loader(index, cfg.data, mode="tencrop", scales=(), batch_size=32, rank=rank,
                           world_size=world, device_id=local_gpu_or_None, num_threads=4)

``build_train_loader`` is the one training loader of every layout: over the folder layout's
files, or, given ``order`` and ``read``, over the sharded layout's samples (``shard_feed`` calls it
so). ``build_val_loader`` reads the folder layout's validation files with DALI's file reader. Both
iterate the shared DALI loaders (``pipeline.data.dali_loaders``: the feed, exact resume, no padded
sample ever yielded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.constants import IMAGENET_MEAN
from pipeline.data.dali_loaders import TrainFeed, TrainLoader, ValLoader, torch_device
from pipeline.data.dali_pipeline import (
    TRAIN_MODES,
    VAL_MODES,
    build_train_pipeline,
    build_val_pipeline,
)
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.loaders import Loader
from pipeline.data.rank_split import augmentation_seed, rank_train_order, rank_val_range
from pipeline.data.stats import pipeline_means
from pipeline.host import usable_cpus


def build_train_loader(
    index: ImageFolderIndex,
    cfg: DataConfig,
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    device_id: int | None,
    seed: int,
    num_threads: int,
    channels_last: bool = False,
    half: bool = False,
    order: Callable[[int], np.ndarray] | None = None,
    read: Callable[[np.ndarray, int, int], list[np.ndarray]] | None = None,
) -> Loader:
    """The training loader: ``N // global_batch`` batches of this rank's ``rank_slice`` per epoch.

    Args:
        index: the scanned dataset (``scan_imagenet``).
        cfg: augmentation ("paper" | "inception" | "none", auto_augment, random_erase), sizes, PCA std,
            normalisation, decoder.
        global_batch: batch over all ranks (split as evenly as it goes: ``rank_slice``).
        rank, world_size: this worker's world rank and the world size.
        device_id: local GPU index (mixed decode, outputs and labels on ``cuda:device_id``) or None.
        seed: run seed; the file order derives from (seed, epoch), augmentation from (seed, epoch, step).
        num_threads: DALI CPU threads (<= 0: every CPU this process may use).
        channels_last: deliver NCHW tensors with channels_last memory.
        half: deliver float16 images.
        order, read: the sharded layout's epoch order and byte reader (``pipeline.data.shard_feed``).

    Returns:
        A Loader; ``epoch(e, start=0)`` yields ``(images [B, 3, crop, crop], labels int64 [B])``.
    """
    if cfg.augment not in TRAIN_MODES:
        raise ValueError(f"data.augment={cfg.augment!r}; choose one of {TRAIN_MODES}")
    files, labels = list(index.train_files), list(index.train_labels)
    # Checks the rank and world size now rather than at the first batch.
    rank_train_order(
        len(files), global_batch=global_batch, rank=rank, world_size=world_size, seed=seed, epoch=0
    )
    threads = num_threads if num_threads > 0 else usable_cpus()

    channel_mean, _ = pipeline_means(cfg, cfg.augment, channels_last, IMAGENET_MEAN)

    def make_feed(epoch: int, step: int) -> TrainFeed:
        return TrainFeed(
            files, labels, cfg, global_batch=global_batch, rank=rank, world_size=world_size,
            seed=seed, epoch=epoch, step=step, channel_mean=channel_mean, order=order, read=read,
        )  # fmt: skip

    def build(feed: TrainFeed) -> Any:
        # "inception" and TrivialAugment draw in DALI; the stream depends on where the pipeline started.
        return build_train_pipeline(
            cfg.augment, feed, cfg, batch_size=feed.per_rank, device_id=device_id, num_threads=threads,
            seed=augmentation_seed(seed, feed.epoch * feed.steps + feed.step, rank),
            channels_last=channels_last, half=half, encoded=read is not None,
        )  # fmt: skip

    return TrainLoader(make_feed, build, len(files) // global_batch, torch_device(device_id), channels_last)


# ---------------------------------------------------------------- validation


def build_val_loader(
    index: ImageFolderIndex,
    cfg: DataConfig,
    *,
    mode: str,
    scales: tuple[int, ...],
    batch_size: int,
    rank: int,
    world_size: int,
    device_id: int | None,
    num_threads: int,
    channels_last: bool = False,
    half: bool = False,
) -> Loader:
    """The test loader: this rank's disjoint share of the val set, in a fixed order, no padding.

    Args:
        index: the scanned dataset.
        cfg: val_resize, crop_size, normalisation, decoder.
        mode: "center" (B,3,c,c) | "tencrop" (B*10,3,c,c, sample-major, torchvision TenCrop order) |
            "multiscale" (list over samples of list over scales of [1,3,h,w], the whole image at
            shorter side s).
        scales: shorter sides for "multiscale"; ignored otherwise.
        batch_size: samples per batch on this worker.
        rank, world_size: world rank and size; the shards partition the val set.
        device_id: local GPU index or None.
        num_threads: DALI CPU threads (<= 0: every CPU this process may use).
        channels_last, half: output memory format and dtype.

    Returns:
        A Loader whose ``epoch(e)`` ignores ``e``; labels are int64 [B].
    """
    if mode not in VAL_MODES:
        raise ValueError(f"eval mode {mode!r}; choose one of {VAL_MODES}")
    if mode == "multiscale" and not scales:
        raise ValueError("eval mode 'multiscale' needs at least one scale (eval.scales)")
    if batch_size < 1:
        raise ValueError(f"val batch_size must be positive, got {batch_size}")
    mine = rank_val_range(len(index.val_files), rank=rank, world_size=world_size)
    files = list(index.val_files[mine.start : mine.stop])
    labels = list(index.val_labels[mine.start : mine.stop])
    device = torch_device(device_id)
    threads = num_threads if num_threads > 0 else usable_cpus()

    def make_pipe() -> Any:
        # An empty slice (more ranks than images) still needs a valid reader: give it one file
        # and yield nothing from it.
        return build_val_pipeline(
            mode,
            files or list(index.val_files[:1]),
            labels or [0],
            cfg,
            batch_size=batch_size,
            device_id=device_id,
            num_threads=threads,
            seed=augmentation_seed(0, 0, rank),
            channels_last=channels_last,
            half=half,
            scales=tuple(scales),
        )

    return ValLoader(mode, files, make_pipe, batch_size, device, channels_last)
