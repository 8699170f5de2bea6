"""ImageNet-layout loaders: this rank's batches from the DALI graphs, as torch tensors.

    index = scan_imagenet(cfg.data.root)
    train = build_train_loader(index, cfg.data, global_batch=256, shard_id=rank, num_shards=world,
                               device_id=local_gpu_or_None, seed=cfg.seed, num_threads=4)
    for images, labels in train.epoch(epoch): ...
    val = build_val_loader(index, cfg.data, mode="tencrop", scales=(), batch_size=32, shard_id=rank,
                           num_shards=world, device_id=local_gpu_or_None, num_threads=4)

Each epoch's file list for this rank comes from ``pipeline.data.sharding`` and is handed to the
reader in order; padded samples (the reader repeats one to fill the last batch) never leave
this module, so summing over ranks scores each image exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.constants import NUM_TEN_CROPS
from pipeline.data.dali_pipeline import READER, TRAIN_MODES, VAL_MODES, build_pipeline
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.sharding import Loader, augmentation_seed, train_shard, val_shard
from pipeline.host import usable_cpus


def _torch_device(device_id: int | None) -> torch.device:
    return torch.device("cpu") if device_id is None else torch.device("cuda", device_id)


def _nchw(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """NHWC data -> logical NCHW with channels_last memory; NCHW data is returned as is."""
    return images.permute(0, 3, 1, 2) if channels_last else images


def _labels(raw: torch.Tensor, device: torch.device) -> torch.Tensor:
    return raw.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)


def _culprits(files: list[str], start: int, window: int) -> list[str]:
    """The files that do not decode among ``files[start:start + window]`` (DALI does not say which)."""
    from pipeline.data.tools import check_image

    found = []
    for path in files[start : start + window]:
        problem = check_image(path)
        if problem is not None:
            found.append(f"{path} ({problem[1]})")
    return found


def _decode_error(pipe: Any, files: list[str], seen: int, error: RuntimeError) -> RuntimeError:
    """``error`` re-worded to name the files that do not decode, when they can be found.

    DALI does not say which file failed; the failing batch is at most the prefetch depth ahead
    of the last one delivered, so only that window of files is checked.
    """
    bad = _culprits(files, seen, pipe.max_batch_size * (pipe.prefetch_queue_depth + 2))
    if not bad:
        return error
    return RuntimeError(
        f"cannot decode {', '.join(bad)}; run `python -m pipeline data verify <root> --fix` "
        "to repair or quarantine such files"
    )


def _dense_batches(pipe: Any, files: list[str], device: torch.device, channels_last: bool) -> Iterator[tuple]:
    """Iterate one pass over a pipeline with dense outputs; only the real samples of ``files``."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    seen = 0
    it = None
    try:
        # The iterator prefetches on construction, so a bad file can fail here already.
        it = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        for batch in it:
            images, labels = batch[0]["images"], batch[0]["labels"]
            n = min(labels.shape[0], len(files) - seen)  # belt and braces: never yield a padded sample
            if n <= 0:
                break
            seen += n
            yield images[:n], _labels(labels[:n], device)
    except RuntimeError as e:
        raise _decode_error(pipe, files, seen, e) from e
    finally:
        del it


class _DaliLoader:
    """A Loader that builds a fresh DALI pipeline for each pass (cheap next to an epoch)."""

    def __init__(self, num_batches: int, make_pass: Callable[[int], Iterator[tuple[Any, torch.Tensor]]]):
        self._num_batches = num_batches
        self._make_pass = make_pass

    def __len__(self) -> int:
        return self._num_batches

    def epoch(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        return self._make_pass(epoch)


def build_train_loader(
    index: ImageFolderIndex,
    cfg: DataConfig,
    *,
    global_batch: int,
    shard_id: int,
    num_shards: int,
    device_id: int | None,
    seed: int,
    num_threads: int,
    channels_last: bool = False,
    half: bool = False,
) -> Loader:
    """The training loader: ``N // global_batch`` batches of ``global_batch // num_shards`` per epoch.

    Args:
        index: the scanned dataset (``scan_imagenet``).
        cfg: augmentation ("paper" | "inception" | "none"), sizes, PCA std, normalisation, decoder.
        global_batch: batch over all ranks; must divide by ``num_shards``.
        shard_id, num_shards: this worker's world rank and the world size.
        device_id: local GPU index (mixed decode, outputs on ``cuda:device_id``) or None (all CPU).
        seed: run seed; the file order derives from (seed, epoch), augmentation from (seed, epoch, rank).
        num_threads: DALI CPU threads (<= 0: every CPU this process may use).
        channels_last: deliver NCHW tensors with channels_last memory.
        half: deliver float16 images.

    Returns:
        A Loader; ``epoch(e)`` yields ``(images [B, 3, crop, crop], labels int64 [B])``.
    """
    if cfg.augment not in TRAIN_MODES:
        raise ValueError(f"data.augment={cfg.augment!r}; choose one of {TRAIN_MODES}")
    files = np.asarray(index.train_files, dtype=object)
    labels = np.asarray(index.train_labels, dtype=np.int64)
    per_rank = global_batch // max(1, num_shards)
    steps = len(files) // global_batch
    train_shard(
        len(files), global_batch=global_batch, shard_id=shard_id, num_shards=num_shards, seed=seed, epoch=0
    )
    device = _torch_device(device_id)
    threads = num_threads if num_threads > 0 else usable_cpus()

    def one_epoch(epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        order = train_shard(
            len(files),
            global_batch=global_batch,
            shard_id=shard_id,
            num_shards=num_shards,
            seed=seed,
            epoch=epoch,
        )
        pipe = build_pipeline(
            cfg.augment,
            files[order].tolist(),
            labels[order].tolist(),
            cfg,
            batch_size=per_rank,
            device_id=device_id,
            num_threads=threads,
            seed=augmentation_seed(seed, epoch, shard_id),
            channels_last=channels_last,
            half=half,
        )
        try:
            for images, lab in _dense_batches(pipe, files[order].tolist(), device, channels_last):
                yield _nchw(images, channels_last), lab
        finally:
            del pipe

    return _DaliLoader(steps, one_epoch)


def build_val_loader(
    index: ImageFolderIndex,
    cfg: DataConfig,
    *,
    mode: str,
    scales: tuple[int, ...],
    batch_size: int,
    shard_id: int,
    num_shards: int,
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
        shard_id, num_shards: world rank and size; the shards partition the val set.
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
    mine = val_shard(len(index.val_files), shard_id=shard_id, num_shards=num_shards)
    files = list(index.val_files[mine.start : mine.stop])
    labels = list(index.val_labels[mine.start : mine.stop])
    device = _torch_device(device_id)
    threads = num_threads if num_threads > 0 else usable_cpus()
    num_batches = -(-len(files) // batch_size)

    def make_pipe() -> Any:
        # An empty shard (more ranks than images) still needs a valid reader: give it one file
        # and yield nothing from it.
        return build_pipeline(
            mode,
            files or list(index.val_files[:1]),
            labels or [0],
            cfg,
            batch_size=batch_size,
            device_id=device_id,
            num_threads=threads,
            seed=augmentation_seed(0, 0, shard_id),
            channels_last=channels_last,
            half=half,
            scales=tuple(scales),
        )

    def one_pass(_epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        if not files:
            return
        pipe = make_pipe()
        try:
            if mode == "multiscale":
                yield from _multiscale_batches(pipe, len(files), batch_size, device, channels_last)
                return
            for images, lab in _dense_batches(pipe, files, device, channels_last):
                if mode == "tencrop":
                    # [B, 10, ...] -> [B*10, ...]: rows 10i..10i+9 are sample i's crops.
                    images = images.reshape(images.shape[0] * NUM_TEN_CROPS, *images.shape[2:])
                yield _nchw(images, channels_last), lab
        finally:
            del pipe

    return _DaliLoader(num_batches, one_pass)


def _multiscale_batches(
    pipe: Any, num_samples: int, batch_size: int, device: torch.device, channels_last: bool
) -> Iterator[tuple[list[list[torch.Tensor]], torch.Tensor]]:
    """Varying image sizes cannot form one tensor: copy each sample's output on its own."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    seen = 0
    while seen < num_samples:
        outs = pipe.run()
        *scaled, labels = outs
        n = min(batch_size, num_samples - seen)  # the reader pads the last batch; drop the padding
        batch: list[list[torch.Tensor]] = []
        for i in range(n):
            per_scale = []
            for tl in scaled:
                t = tl[i]
                out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
                feed_ndarray(
                    t, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None
                )
                per_scale.append(_nchw(out.unsqueeze(0), channels_last))
            batch.append(per_scale)
        lab = labels.as_cpu() if hasattr(labels, "as_cpu") else labels
        lab_t = torch.as_tensor(np.array(lab.as_array()).reshape(-1)[:n], dtype=torch.int64).to(device)
        seen += n
        yield batch, lab_t
