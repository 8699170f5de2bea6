"""The DALI graphs: the training augmentations, fed batch by batch, and the test protocols.

    pipe = build_train_pipeline("paper", feed, cfg.data, batch_size=64, device_id=None, num_threads=2,
                                seed=0, channels_last=False, half=False)
    pipe = build_val_pipeline("tencrop", files, labels, cfg.data, batch_size=32, device_id=None,
                          num_threads=2, seed=0, channels_last=False, half=False)

Training pipelines are built once per run and fed by an external source: each batch's file
names, labels and augmentation parameters come from ``pipeline.data.imagenet``'s feed, which
computes them as pure functions of (seed, epoch, step, position in the global batch). So a
run resumed at any step, on any world size, sees the very images and crops it would have
seen; and the feed runs on across epoch boundaries, so DALI's prefetching never drains. Test
pipelines read a fixed shard with DALI's file reader. Files are read by DALI itself, local
paths and ``s3://`` alike (``AWS_ENDPOINT_URL`` and the rest of the AWS environment apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.constants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PCA_EIGVAL,
    PCA_EIGVEC,
    PCA_SCALE,
)
from pipeline.data.dali_eval import crop_windows, cut, resize_like_torchvision
from pipeline.data.stats import pipeline_means, subtract_pixel_mean

TRAIN_MODES = ("paper", "inception", "none")
VAL_MODES = ("center", "tencrop", "multiscale")
READER = "Reader"
# What the training feed delivers per sample, in this order: names, labels[, crop side][, scale,
# pos_x, pos_y, mirror, mean][, erase anchor, erase shape]. The random crops take their side from
# the feed (data.res_schedule); the erased rectangles come last (data.random_erase).
FEED_OUTPUTS = {"paper": 8, "inception": 3, "none": 2}
ERASE_OUTPUTS = 2


def feed_outputs(cfg: DataConfig) -> int:
    """How many per-sample lists the training feed yields for ``cfg``."""
    return FEED_OUTPUTS[cfg.augment] + (ERASE_OUTPUTS if cfg.random_erase > 0 else 0)


def _decoder_device(cfg: DataConfig, device_id: int | None) -> str:
    if device_id is None:
        if cfg.decoder == "mixed":
            raise ValueError("data.decoder='mixed' needs a GPU (device_id); use data.decoder=auto or cpu")
        return "cpu"
    return "cpu" if cfg.decoder == "cpu" else "mixed"


def _pipeline_kwargs(
    cfg: DataConfig, batch_size: int, device_id: int | None, num_threads: int, seed: int
) -> dict[str, Any]:
    return {
        "batch_size": batch_size,
        "num_threads": max(1, num_threads),
        "device_id": device_id,
        "seed": seed,
        "prefetch_queue_depth": max(1, cfg.prefetch),
    }


def _new_pipeline(
    cfg: DataConfig, batch_size: int, device_id: int | None, num_threads: int, seed: int
) -> Any:
    from nvidia.dali import Pipeline

    return Pipeline(**_pipeline_kwargs(cfg, batch_size, device_id, num_threads, seed))


def _flip_and_trivial_augment(images: Any, mirror: Any) -> Any:
    """torchvision's order (presets.ClassificationPresetTrain): the crop, its flip, then TrivialAugment
    Wide, on HWC uint8 pixels. DALI's suite: 31 magnitude bins, shifts up to 32 px, each sample's
    operation and magnitude drawn by DALI's RNG (the pipeline seed)."""
    import nvidia.dali.fn as fn
    from nvidia.dali.auto_aug import trivial_augment

    images = fn.flip(images, horizontal=mirror)
    # fill_value 0: torchvision's TrivialAugmentWide(fill=None) fills what a warp uncovers with black.
    return trivial_augment.trivial_augment_wide(images, fill_value=0)


def _decode_kwargs(cfg: DataConfig, device_id: int | None) -> tuple[dict[str, Any], bool]:
    """(decoder arguments, whether decoded images still have to move to the GPU)."""
    import nvidia.dali.types as types

    device = _decoder_device(cfg, device_id)
    kwargs: dict[str, Any] = {"device": device, "output_type": types.RGB}
    if device == "mixed":
        kwargs["hw_decoder_load"] = cfg.hw_decoder_load
    # The mixed decoder's outputs are on the GPU already; a CPU decode feeding a GPU run moves there.
    return kwargs, device_id is not None and device == "cpu"


def _normalize_kwargs(cfg: DataConfig, channels_last: bool, half: bool) -> dict[str, Any]:
    """crop_mirror_normalize's layout, dtype and std (``half``: float16 out; pass False when a mean
    image is subtracted afterwards, which casts at the end)."""
    import nvidia.dali.types as types

    std = IMAGENET_STD if cfg.normalize == "meanstd" else (1.0, 1.0, 1.0)
    return {
        "dtype": types.FLOAT16 if half else types.FLOAT,
        "output_layout": "HWC" if channels_last else "CHW",
        "std": [float(x) for x in std],
    }


def lighting_means(alphas: np.ndarray, base_mean: Any = IMAGENET_MEAN) -> np.ndarray:
    """Per-sample normalisation means with AlexNet PCA lighting folded in: mean - eigvec @ (a * eigval).

    Lighting adds one RGB offset per image, so subtracting ``mean - offset`` in the normaliser
    is the same arithmetic without an extra pass over the pixels. ``alphas`` [N, 3] ~ N(0,
    pca_std); the eigen-values are for 0-1 pixels, hence PCA_SCALE. ``base_mean``: the channel
    means otherwise subtracted (zeros when a mean image is subtracted afterwards). Returns float32 [N, 3].
    """
    basis = np.asarray(PCA_EIGVEC, np.float64) * np.asarray(PCA_EIGVAL, np.float64) * PCA_SCALE
    offsets = alphas.astype(np.float64) @ basis.T  # offset_c = sum_j eigvec[c][j] * eigval[j] * scale * a_j
    return (np.asarray(base_mean, np.float64)[None, :] - offsets).astype(np.float32)


def build_train_pipeline(
    mode: str,
    feed: Any,
    cfg: DataConfig,
    *,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    seed: int,
    channels_last: bool,
    half: bool,
    encoded: bool = False,
) -> Any:
    """The training pipeline for ``mode``, fed batch by batch by ``feed``.

    Args:
        mode: "paper" (the paper's scale augmentation, crop, flip, PCA lighting), "inception"
            (random-resized crop, DALI's own randomness: not replayed exactly on resume), "none"
            (resize and centre crop).
        feed: an iterator yielding, per batch, ``feed_outputs(cfg)`` lists of per-sample arrays:
            UTF-8 file names (uint8), labels (int64), for "paper" and "inception" the crop's side
            (float32, the same for the whole batch: ``data.res_schedule``'s for its epoch), for
            "paper" the shorter side to scale to, the crop position (x, y in [0, 1]), the flip
            (int32) and the normalisation mean [3], and with ``data.random_erase`` the erased
            rectangle's anchor [top, left] and shape [height, width] (float32 pixels, 0 x 0: none).
        cfg: sizes, normalisation, decoder choice, ``mmap``, ``auto_augment``, ``random_erase``.
        batch_size: samples per batch (this rank's share of the global batch).
        device_id: local GPU index, or None for an all-CPU pipeline.
        num_threads: DALI CPU worker threads.
        seed: seeds DALI's own random operators ("inception"'s crop and flip, TrivialAugment).
        channels_last, half: output layout HWC instead of CHW; float16 instead of float32.
        encoded: the feed's first output is the encoded image itself, not its file name (the
            sharded layout reads the bytes from the node's shard cache).

    Returns:
        A built pipeline with outputs (images, labels), labels on the GPU when ``device_id`` is set.
    """
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if mode not in TRAIN_MODES:
        raise ValueError(f"data.augment={mode!r}; choose one of {TRAIN_MODES}")
    if mode == "none" and (cfg.auto_augment != "none" or cfg.random_erase > 0):
        raise ValueError(
            "data.auto_augment and data.random_erase follow a random crop: data.augment paper or inception"
        )
    decode_kwargs, to_gpu = _decode_kwargs(cfg, device_id)
    # data.normalize=mean: the training set's mean from `data stats` (pipeline.data.stats); the
    # feed folds the same channel means into "paper"'s per-sample means.
    channel_mean, pixel_mean = pipeline_means(cfg, mode, channels_last, IMAGENET_MEAN)
    cmn_kwargs = _normalize_kwargs(cfg, channels_last, half and pixel_mean is None)
    mean = [float(x) for x in channel_mean]
    auto_augment = cfg.auto_augment == "ta_wide"

    def graph() -> tuple[Any, Any]:
        names, labels, *aug = fn.external_source(source=feed, num_outputs=feed_outputs(cfg), batch=True)
        if cfg.random_erase > 0:
            *aug, erase_anchor, erase_shape = aug
        # mmap pays off on a local disk only; on network filesystems (Lustre, NFS, Filestore) plain reads win.
        jpegs = names if encoded else fn.io.file.read(names, dont_use_mmap=not cfg.mmap)
        if mode == "paper":
            side, scale, pos_x, pos_y, mirror, sample_mean = aug
            # Resize-shorter-to-S-then-crop-c, computed the cheap way: the c x c crop of the image
            # scaled to shorter side S is a (c * short / S)^2 window of the original. Decode only
            # that window (ROI decode) and resize it straight to c x c, instead of decoding and
            # resizing the whole image to up to 480 x 640 and throwing most of it away.
            shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # [H, W, C], EXIF-oriented like the decoder
            short = dali.math.min(shape[0], shape[1])
            window = dali.math.min(short, side * short / scale)
            images = fn.decoders.image_crop(
                jpegs, crop_w=window, crop_h=window, crop_pos_x=pos_x, crop_pos_y=pos_y, **decode_kwargs
            )
            images = images.gpu() if to_gpu else images
            # The side is an input, not a constant: a new resolution needs no new pipeline.
            images = fn.resize(images, resize_x=side, resize_y=side, antialias=True)
            if auto_augment:
                images, mirror = _flip_and_trivial_augment(images, mirror), 0
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=sample_mean, **cmn_kwargs)
        elif mode == "inception":
            (side,) = aug
            # Decode only the random window (ROI decode); then one resize straight to the crop size.
            images = fn.decoders.image_random_crop(
                jpegs,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=100,
                **decode_kwargs,
            )
            images = images.gpu() if to_gpu else images
            images = fn.resize(images, resize_x=side, resize_y=side, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
            if auto_augment:
                images, mirror = _flip_and_trivial_augment(images, mirror), 0
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, **cmn_kwargs)
        else:  # "none": the centre crop of the test protocol, torchvision's pixels
            images = fn.decoders.image(jpegs, **decode_kwargs)
            images = images.gpu() if to_gpu else images
            images, height, width = resize_like_torchvision(images, jpegs, cfg.val_resize)
            ((top, left, _),) = crop_windows("center", height, width, cfg.crop_size)
            images = fn.crop_mirror_normalize(cut(images, top, left, cfg.crop_size), mean=mean, **cmn_kwargs)
        if pixel_mean is not None:
            images = subtract_pixel_mean(images, pixel_mean, half=half, on_gpu=device_id is not None)
        if cfg.random_erase > 0:
            # Last, on the normalised crop: 0 here is torchvision's RandomErasing(value=0).
            images = fn.erase(
                images, anchor=erase_anchor, shape=erase_shape, axes=[0, 1] if channels_last else [1, 2],
                fill_value=0.0,
            )  # fmt: skip
        return images, labels.gpu() if device_id is not None else labels

    # TrivialAugment picks each sample's operation with DALI's `if` on data, which only a pipeline
    # function converted with enable_conditionals runs; without it the graph is the one it always was.
    kwargs = _pipeline_kwargs(cfg, batch_size, device_id, num_threads, seed)
    # (DALI's own TrivialAugment suite warns that it calls its deprecated fn.experimental.filter and
    # equalize; DALI forces that warning on, so it cannot be filtered here.)
    pipe = dali.pipeline_def(graph, enable_conditionals=auto_augment, **kwargs)()
    pipe.build()
    return pipe


def build_val_pipeline(
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
    source: Any = None,
) -> Any:
    """One test pipeline for ``mode`` over ``files`` in the given order.

    Args:
        mode: "center" | "tencrop" | "multiscale".
        files, labels: what the reader yields, in this order (no shuffling, no split over ranks here).
        cfg: crop/scale sizes, PCA std, normalisation, decoder choice.
        batch_size: samples per ``run()``.
        device_id: local GPU index, or None for an all-CPU pipeline.
        num_threads: DALI CPU worker threads.
        seed: the pipeline seed (the test modes draw nothing random).
        channels_last, half: output layout HWC instead of CHW; float16 instead of float32.
        scales: shorter sides for "multiscale" (one output per scale).
        source: instead of reading ``files``, an external source yielding batches of (encoded
            image, label) (the sharded layout); the caller then pads and counts the batches.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs (images..., labels).
    """
    import nvidia.dali.fn as fn

    if mode not in VAL_MODES:
        raise ValueError(f"eval mode {mode!r}; choose one of {VAL_MODES}")
    pipe = _new_pipeline(cfg, batch_size, device_id, num_threads, seed)
    decode_kwargs, to_gpu = _decode_kwargs(cfg, device_id)
    # data.normalize=mean: the training set's mean from `data stats` (pipeline.data.stats).
    channel_mean, pixel_mean = pipeline_means(cfg, mode, channels_last, IMAGENET_MEAN)
    cmn_kwargs = _normalize_kwargs(cfg, channels_last, half and pixel_mean is None)
    mean = [float(x) for x in channel_mean]

    with pipe:
        if source is not None:
            jpegs, label = fn.external_source(source=source, num_outputs=2, batch=True)
        else:
            jpegs, label = fn.readers.file(
                files=list(files),
                labels=[int(x) for x in labels],
                random_shuffle=False,
                pad_last_batch=True,  # the last partial batch repeats a sample; it is cut before yielding
                name=READER,
            )
        images = fn.decoders.image(jpegs, **decode_kwargs)
        if to_gpu:
            images = images.gpu()

        if mode in ("center", "tencrop"):
            # torchvision's Resize + CenterCrop / TenCrop to the pixel (pipeline.data.dali_eval).
            images, height, width = resize_like_torchvision(images, jpegs, cfg.val_resize)
            crops = [
                fn.crop_mirror_normalize(
                    cut(images, top, left, cfg.eval_crop), mirror=int(m), mean=mean, **cmn_kwargs
                )
                for top, left, m in crop_windows(mode, height, width, cfg.eval_crop)
            ]
            # tencrop: [10, C, H, W] per sample, sample-major rows in TenCrop's order.
            outputs = crops if mode == "center" else [fn.stack(*crops, axis=0)]
        elif mode == "multiscale":
            outputs = [
                fn.crop_mirror_normalize(
                    resize_like_torchvision(images, jpegs, s)[0], mean=mean, **cmn_kwargs
                )
                for s in scales
            ]
        else:
            raise AssertionError(mode)  # checked above
        if pixel_mean is not None:
            on_gpu = device_id is not None
            outputs = [subtract_pixel_mean(o, pixel_mean, half=half, on_gpu=on_gpu) for o in outputs]
        pipe.set_outputs(*outputs, label)
    pipe.build()
    return pipe
