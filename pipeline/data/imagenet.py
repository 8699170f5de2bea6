"""DALI pipelines for ImageNet-layout data: training augmentation and the paper's test protocols.

    index = scan_imagenet(cfg.data.root)
    train = build_train_loader(index, cfg.data, global_batch=256, shard_id=rank, num_shards=world,
                               device_id=local_gpu_or_None, seed=cfg.seed, num_threads=4)
    for images, labels in train.epoch(epoch): ...
    val = build_val_loader(index, cfg.data, mode="tencrop", scales=(), batch_size=32, shard_id=rank,
                           num_shards=world, device_id=local_gpu_or_None, num_threads=4)

One builder, ``_build_pipeline(mode=...)``, makes every pipeline: the train modes ("paper",
"inception", "none") and the test modes ("center", "tencrop", "multiscale") share the reader,
the decoder and the normalisation, and differ only in the geometric step between them.

Sharding is done here, not by the DALI reader: each epoch's file list for this rank is computed
in numpy and handed to ``fn.readers.file(files=...)`` in order. That keeps the train order a
pure function of (seed, epoch) - so a resumed epoch replays exactly - and makes every rank take
the same number of steps (DDP needs it). Validation shards are disjoint contiguous slices and
padded samples never leave this module, so summing over ranks scores each image exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.constants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_TEN_CROPS,
    PCA_EIGVAL,
    PCA_EIGVEC,
    PCA_SCALE,
)
from pipeline.data.layout import ImageFolderIndex

TRAIN_MODES = ("paper", "inception", "none")
VAL_MODES = ("center", "tencrop", "multiscale")
READER = "Reader"

# TenCrop order (torchvision): five_crop(img) then five_crop(hflip(img)). A crop of the flipped
# image at the left edge is the mirror of the original's crop at the right edge, hence pos_x 1-x.
_FIVE = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # (pos_x, pos_y): tl, tr, bl, br, c
TEN_CROP_WINDOWS: tuple[tuple[float, float, int], ...] = tuple((x, y, 0) for x, y in _FIVE) + tuple(
    (1.0 - x, y, 1) for x, y in _FIVE
)


class Loader(Protocol):
    """What the engine iterates: a fixed number of batches per epoch on this rank."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor]]: ...


# ---------------------------------------------------------------- sharding (pure functions)


def train_shard(
    num_files: int, *, global_batch: int, shard_id: int, num_shards: int, seed: int, epoch: int
) -> np.ndarray:
    """Indices this rank reads in ``epoch``, in order: ``len == steps * global_batch // num_shards``.

    A full permutation from ``default_rng([seed, epoch])`` is cut to whole global batches; rank r
    takes the r-th contiguous slice of every global batch, so the global batch at step k is the
    same whatever the world size, and every rank takes ``num_files // global_batch`` steps.
    """
    _check_shard(shard_id, num_shards)
    if global_batch % num_shards:
        raise ValueError(f"global batch {global_batch} does not divide over {num_shards} shards")
    steps = num_files // global_batch
    if steps == 0:
        raise ValueError(f"global batch {global_batch} is larger than the training set ({num_files} images)")
    perm = np.random.default_rng([seed, epoch]).permutation(num_files)[: steps * global_batch]
    per_rank = global_batch // num_shards
    return perm.reshape(steps, num_shards, per_rank)[:, shard_id, :].reshape(-1)


def val_shard(num_files: int, *, shard_id: int, num_shards: int) -> range:
    """This rank's contiguous slice of the validation set (DALI's own shard formula)."""
    _check_shard(shard_id, num_shards)
    return range(num_files * shard_id // num_shards, num_files * (shard_id + 1) // num_shards)


def _check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, num_shards={num_shards})")


def augmentation_seed(seed: int, epoch: int, shard_id: int) -> int:
    """DALI's pipeline seed: distinct per (seed, epoch, rank), reproducible on resume."""
    return int(np.random.SeedSequence([seed, epoch, shard_id]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------- the pipeline builder


def _decoder_device(cfg: DataConfig, device_id: int | None) -> str:
    if device_id is None:
        if cfg.decoder == "mixed":
            raise ValueError("data.decoder='mixed' needs a GPU (device_id); use data.decoder=auto or cpu")
        return "cpu"
    return "cpu" if cfg.decoder == "cpu" else "mixed"


def _build_pipeline(
    mode: str,
    files: Sequence[str],
    labels: Sequence[int],
    cfg: DataConfig,
    *,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    seed: int,
    channels_last: bool,
    half: bool,
    scales: tuple[int, ...] = (),
) -> Any:
    """One DALI pipeline for ``mode`` over ``files`` in the given order.

    Args:
        mode: "paper" | "inception" | "none" (training) or "center" | "tencrop" | "multiscale" (test).
        files, labels: what the reader yields, in this order (no shuffling, no sharding here).
        cfg: crop/scale sizes, PCA std, normalisation, decoder choice.
        batch_size: samples per ``run()``.
        device_id: local GPU index, or None for an all-CPU pipeline.
        num_threads: DALI CPU worker threads.
        seed: the pipeline seed every random operator derives from.
        channels_last, half: output layout HWC instead of CHW; float16 instead of float32.
        scales: shorter sides for "multiscale" (one output per scale).

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs (images..., labels).
    """
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=max(1, cfg.prefetch),
    )
    decode_device = _decoder_device(cfg, device_id)
    # The mixed decoder's outputs are on the GPU already; a CPU decode feeding a GPU run moves there.
    to_gpu = device_id is not None and decode_device == "cpu"
    decode_kwargs: dict[str, Any] = {"device": decode_device, "output_type": types.RGB}
    if decode_device == "mixed":
        decode_kwargs["hw_decoder_load"] = cfg.hw_decoder_load
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD if cfg.normalize == "meanstd" else (1.0, 1.0, 1.0), np.float32)
    cmn_kwargs: dict[str, Any] = {
        "dtype": types.FLOAT16 if half else types.FLOAT,
        "output_layout": "HWC" if channels_last else "CHW",
        "std": std.tolist(),
    }
    crop = (cfg.crop_size, cfg.crop_size)

    with pipe:
        jpegs, label = fn.readers.file(
            files=list(files),
            labels=[int(x) for x in labels],
            random_shuffle=False,
            pad_last_batch=True,  # the last partial batch repeats a sample; it is cut before yielding
            name=READER,
        )
        if mode == "paper":
            # Resize-shorter-to-S-then-crop-c, computed the cheap way: the c x c crop of the image
            # scaled to shorter side S is a (c * short / S)^2 window of the original. Decode only
            # that window (ROI decode) and resize it straight to c x c, instead of decoding and
            # resizing the whole image to up to 480 x 640 and throwing most of it away.
            lo, hi = float(cfg.scale_min), float(cfg.scale_max)
            shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # [H, W, C], EXIF-oriented like the decoder
            short = dali.math.min(shape[0], shape[1])
            scale = fn.random.uniform(range=[lo, hi]) if hi > lo else lo
            window = dali.math.min(short, float(cfg.crop_size) * short / scale)
            images = fn.decoders.image_crop(
                jpegs,
                crop_w=window,
                crop_h=window,
                crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                crop_pos_y=fn.random.uniform(range=[0.0, 1.0]),
                **decode_kwargs,
            )
        elif mode == "inception":
            # Decode only the random window (ROI decode); then one resize straight to the crop size.
            images = fn.decoders.image_random_crop(
                jpegs,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=100,
                **decode_kwargs,
            )
        else:
            images = fn.decoders.image(jpegs, **decode_kwargs)
        if to_gpu:
            images = images.gpu()

        if mode == "paper":
            images = fn.resize(images, size=list(crop), antialias=True)
            outputs = [
                fn.crop_mirror_normalize(
                    images,
                    mirror=fn.random.coin_flip(probability=0.5),
                    mean=_lighting_mean(mean, cfg.pca_std) if cfg.pca_std > 0 else mean.tolist(),
                    **cmn_kwargs,
                )
            ]
        elif mode == "inception":
            images = fn.resize(images, size=list(crop), antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
            outputs = [fn.crop_mirror_normalize(images, mirror=mirror, mean=mean.tolist(), **cmn_kwargs)]
        elif mode in ("none", "center"):
            images = fn.resize(images, resize_shorter=float(cfg.val_resize), antialias=True)
            outputs = [fn.crop_mirror_normalize(images, crop=crop, mean=mean.tolist(), **cmn_kwargs)]
        elif mode == "tencrop":
            images = fn.resize(images, resize_shorter=float(cfg.val_resize), antialias=True)
            crops = [
                fn.crop_mirror_normalize(
                    images, crop=crop, crop_pos_x=x, crop_pos_y=y, mirror=m, mean=mean.tolist(), **cmn_kwargs
                )
                for x, y, m in TEN_CROP_WINDOWS
            ]
            outputs = [fn.stack(*crops, axis=0)]  # [10, C, H, W] per sample: sample-major rows
        elif mode == "multiscale":
            outputs = [
                fn.crop_mirror_normalize(
                    fn.resize(images, resize_shorter=float(s), antialias=True),
                    mean=mean.tolist(),
                    **cmn_kwargs,
                )
                for s in scales
            ]
        else:
            raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {TRAIN_MODES + VAL_MODES}")
        pipe.set_outputs(*outputs, label)
    pipe.build()
    return pipe


def _lighting_mean(mean: np.ndarray, pca_std: float) -> Any:
    """Per-sample mean with AlexNet PCA lighting folded in: (x + eigvec @ (a * eigval)) - mean.

    Lighting adds one RGB offset per image, so subtracting ``mean - offset`` in the normaliser
    is the same arithmetic without an extra pass over the pixels. alpha ~ N(0, pca_std) per
    image and eigen-component; the eigen-values are for 0-1 pixels, hence PCA_SCALE.
    """
    import nvidia.dali.fn as fn

    alphas = [fn.random.normal(stddev=pca_std) for _ in range(3)]
    channels = []
    for c in range(3):
        offset = sum(PCA_EIGVEC[c][j] * PCA_EIGVAL[j] * PCA_SCALE * alphas[j] for j in range(3))
        channels.append(float(mean[c]) - offset)
    return fn.stack(*channels)


# ---------------------------------------------------------------- loaders


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


def _threads(num_threads: int) -> int:
    if num_threads > 0:
        return num_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


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
    threads = _threads(num_threads)

    def one_epoch(epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        order = train_shard(
            len(files),
            global_batch=global_batch,
            shard_id=shard_id,
            num_shards=num_shards,
            seed=seed,
            epoch=epoch,
        )
        pipe = _build_pipeline(
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
    threads = _threads(num_threads)
    num_batches = -(-len(files) // batch_size)

    def make_pipe() -> Any:
        # An empty shard (more ranks than images) still needs a valid reader: give it one file
        # and yield nothing from it.
        return _build_pipeline(
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
