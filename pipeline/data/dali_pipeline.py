"""The DALI graphs: one builder for the paper's training augmentation and its test protocols.

    pipe = build_pipeline("tencrop", files, labels, cfg.data, batch_size=32, device_id=None,
                          num_threads=2, seed=0, channels_last=False, half=False)

The train modes ("paper", "inception", "none") and the test modes ("center", "tencrop",
"multiscale") share the reader, the decoder and the normalisation, and differ only in the
geometric step between them. The reader takes the files in the order given: sharding and
shuffling are decided in ``pipeline.data.sharding``.
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


def _decoder_device(cfg: DataConfig, device_id: int | None) -> str:
    if device_id is None:
        if cfg.decoder == "mixed":
            raise ValueError("data.decoder='mixed' needs a GPU (device_id); use data.decoder=auto or cpu")
        return "cpu"
    return "cpu" if cfg.decoder == "cpu" else "mixed"


def build_pipeline(
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
    # data.normalize=mean: the training set's mean from `data stats` (pipeline.data.stats).
    channel_mean, pixel_mean = pipeline_means(cfg, mode, channels_last, IMAGENET_MEAN)
    mean = np.asarray(channel_mean, np.float32)
    std = np.asarray(IMAGENET_STD if cfg.normalize == "meanstd" else (1.0, 1.0, 1.0), np.float32)
    cmn_kwargs: dict[str, Any] = {
        "dtype": types.FLOAT16 if half and pixel_mean is None else types.FLOAT,
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
        elif mode == "none":
            images = fn.resize(images, resize_shorter=float(cfg.val_resize), antialias=True)
            outputs = [fn.crop_mirror_normalize(images, crop=crop, mean=mean.tolist(), **cmn_kwargs)]
        elif mode in ("center", "tencrop"):
            # torchvision's Resize + CenterCrop / TenCrop to the pixel (pipeline.data.dali_eval).
            images, height, width = resize_like_torchvision(images, jpegs, cfg.val_resize)
            crops = [
                fn.crop_mirror_normalize(
                    cut(images, top, left, cfg.crop_size), mirror=int(m), mean=mean.tolist(), **cmn_kwargs
                )
                for top, left, m in crop_windows(mode, height, width, cfg.crop_size)
            ]
            # tencrop: [10, C, H, W] per sample, sample-major rows in TenCrop's order.
            outputs = crops if mode == "center" else [fn.stack(*crops, axis=0)]
        elif mode == "multiscale":
            outputs = [
                fn.crop_mirror_normalize(
                    resize_like_torchvision(images, jpegs, s)[0], mean=mean.tolist(), **cmn_kwargs
                )
                for s in scales
            ]
        else:
            raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {TRAIN_MODES + VAL_MODES}")
        if pixel_mean is not None:
            on_gpu = device_id is not None
            outputs = [subtract_pixel_mean(o, pixel_mean, half=half, on_gpu=on_gpu) for o in outputs]
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
