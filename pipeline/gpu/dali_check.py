"""The DALI part of the GPU check: every pipeline mode on the CPU, and with ``mixed`` decode on a GPU.

The loaders are the project's own (``pipeline.data.imagenet``), so what is checked is what a
training run uses. Test modes (centre, 10-crop, multi-scale) draw nothing random and must give
the same pixels whatever decodes them, up to the decoders' rounding: compared element by
element, in 0-255 intensity units (the normaliser's std undone). Training modes are compared
by shape, dtype, value range and per-channel statistics ("inception" draws its windows in DALI,
so only its statistics are compared, with a looser bound).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD, TEST_SCALES

TRAIN_MODES = ("paper", "inception", "none")
VAL_MODES = ("center", "tencrop", "multiscale")
BATCH = 8  # images per compared batch


class CheckFailed(AssertionError):
    """A check whose result is wrong; the message says what was expected and what was found."""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Bounds in 0-255 intensity units."""

    mean: float = 2.0  # mean |a - b| over all elements (test modes)
    p99: float = 16.0  # 99th percentile of |a - b| (test modes)
    stats: float = 3.0  # per-channel mean and std, deterministic training modes
    random_stats: float = 12.0  # per-channel mean and std, "inception" (its own random windows)


def data_config(root: str, augment: str, decoder: str, crop: int = 224, val_resize: int = 256) -> DataConfig:
    """The paper's ImageNet settings at ``crop``, per-channel normalisation (no mean file needed)."""
    return DataConfig(
        root=root,
        augment=augment,
        crop_size=crop,
        scale_min=max(crop, round(256 * crop / 224)),
        scale_max=max(crop, round(480 * crop / 224)),
        val_resize=val_resize,
        normalize="meanstd",
        decoder=decoder,
        num_threads=0,
    )


def to_intensity(images: torch.Tensor) -> np.ndarray:
    """NCHW normalised images -> float64 NCHW on the 0-255 scale (the normaliser undone)."""
    x = images.detach().float().cpu().numpy().astype(np.float64)
    std = np.asarray(IMAGENET_STD, np.float64)[None, :, None, None]
    mean = np.asarray(IMAGENET_MEAN, np.float64)[None, :, None, None]
    return x * std + mean


def compare_pixels(a: np.ndarray, b: np.ndarray, tol: Tolerance, what: str) -> dict[str, float]:
    """Element-wise agreement of two intensity arrays; ``CheckFailed`` beyond ``tol``."""
    if a.shape != b.shape:
        raise CheckFailed(f"{what}: shapes differ, {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    out = {
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)),
        "max_abs": float(diff.max()),
    }
    if not np.isfinite(diff).all():
        raise CheckFailed(f"{what}: non-finite values")
    if out["mean_abs"] > tol.mean or out["p99_abs"] > tol.p99:
        raise CheckFailed(
            f"{what}: mean |diff| {out['mean_abs']:.3f} (bound {tol.mean}), 99th percentile "
            f"{out['p99_abs']:.3f} (bound {tol.p99}) in 0-255 units"
        )
    return out


def channel_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean, std, min and max of an NCHW intensity array."""
    return {
        "mean": [float(v) for v in x.mean(axis=(0, 2, 3))],
        "std": [float(v) for v in x.std(axis=(0, 2, 3))],
        "min": [float(v) for v in x.min(axis=(0, 2, 3))],
        "max": [float(v) for v in x.max(axis=(0, 2, 3))],
    }


def compare_stats(a: np.ndarray, b: np.ndarray, bound: float, what: str) -> dict[str, Any]:
    """Same shape, per-channel mean and std within ``bound``, values in a plausible pixel range."""
    if a.shape != b.shape:
        raise CheckFailed(f"{what}: shapes differ, {a.shape} vs {b.shape}")
    sa, sb = channel_stats(a), channel_stats(b)
    worst = max(
        max(abs(x - y) for x, y in zip(sa["mean"], sb["mean"], strict=True)),
        max(abs(x - y) for x, y in zip(sa["std"], sb["std"], strict=True)),
    )
    check_range(a, what + " (first)")
    check_range(b, what + " (second)")
    if worst > bound:
        raise CheckFailed(f"{what}: per-channel mean/std differ by {worst:.3f} (bound {bound}): {sa} vs {sb}")
    return {"first": sa, "second": sb, "max_stat_diff": worst}


def check_range(x: np.ndarray, what: str) -> None:
    """Intensities of a decoded photo lie in [0, 255] (PCA lighting may shift them by a few)."""
    if not np.isfinite(x).all():
        raise CheckFailed(f"{what}: non-finite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -40 or hi > 295 or hi - lo < 20:
        raise CheckFailed(f"{what}: intensities span [{lo:.1f}, {hi:.1f}], not a decoded photo's [0, 255]")


def _index(root: str):
    from pipeline.data.layout import scan_imagenet

    return scan_imagenet(root, use_index=False)


def train_batch(root: str, mode: str, device_id: int | None, threads: int, crop: int = 224) -> torch.Tensor:
    """The first training batch of ``mode`` (seed 0) from the project's loader."""
    from pipeline.data.imagenet import build_train_loader

    decoder = "cpu" if device_id is None else "mixed"
    loader = build_train_loader(
        _index(root), data_config(root, mode, decoder, crop), global_batch=BATCH, rank=0, world_size=1,
        device_id=device_id, seed=0, num_threads=threads,
    )  # fmt: skip
    images, labels = next(iter(loader.epoch(0)))
    _expect(images, (BATCH, 3, crop, crop), device_id, f"train mode {mode!r}")
    if labels.dtype != torch.int64 or labels.shape != (BATCH,):
        raise CheckFailed(
            f"train mode {mode!r}: labels {labels.dtype} {tuple(labels.shape)}, expected int64 ({BATCH},)"
        )
    return images


def val_batch(
    root: str, mode: str, device_id: int | None, threads: int, crop: int = 224
) -> list[torch.Tensor]:
    """The first validation batch of ``mode`` as a list of NCHW tensors (multi-scale: one per view)."""
    from pipeline.data.imagenet import build_val_loader

    decoder = "cpu" if device_id is None else "mixed"
    loader = build_val_loader(
        _index(root), data_config(root, "none", decoder, crop), mode=mode, scales=TEST_SCALES,
        batch_size=BATCH, rank=0, world_size=1, device_id=device_id, num_threads=threads,
    )  # fmt: skip
    images, labels = next(iter(loader.epoch(0)))
    if labels.shape != (BATCH,):
        raise CheckFailed(f"val mode {mode!r}: {tuple(labels.shape)} labels, expected {BATCH}")
    if mode == "center":
        _expect(images, (BATCH, 3, crop, crop), device_id, "val mode 'center'")
        return [images]
    if mode == "tencrop":
        _expect(images, (BATCH * 10, 3, crop, crop), device_id, "val mode 'tencrop'")
        return [images]
    views = [v for sample in images for v in sample]
    if len(views) != BATCH * len(TEST_SCALES):
        raise CheckFailed(f"val mode 'multiscale': {len(views)} views, expected {BATCH} x {len(TEST_SCALES)}")
    for v in views:
        _expect(v, (1, 3, *v.shape[2:]), device_id, "val mode 'multiscale'")
        if min(v.shape[2:]) not in TEST_SCALES:
            raise CheckFailed(
                f"val mode 'multiscale': a view of {tuple(v.shape[2:])} has no shorter side in {TEST_SCALES}"
            )
    return views


def _expect(images: torch.Tensor, shape: tuple[int, ...], device_id: int | None, what: str) -> None:
    want = "cpu" if device_id is None else "cuda"
    if tuple(images.shape) != shape or images.dtype != torch.float32 or images.device.type != want:
        raise CheckFailed(
            f"{what}: got {images.dtype} {tuple(images.shape)} on {images.device}, expected float32 {shape} on {want}"
        )


def torchvision_center(root: str, crop: int = 224, val_resize: int = 256) -> np.ndarray:
    """The first ``BATCH`` validation images through torchvision's ``Resize`` + ``CenterCrop`` (PIL)."""
    from PIL import Image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(val_resize, antialias=True), v2.CenterCrop(crop), v2.PILToTensor()])
    index = _index(root)
    rows = []
    for path in index.val_files[:BATCH]:
        with Image.open(path) as img:
            rows.append(tf(img.convert("RGB")).numpy().astype(np.float64))
    return np.stack(rows)


def cpu_pipelines(root: str, threads: int, tol: Tolerance) -> dict[str, Any]:
    """Every mode on the CPU (shapes, dtypes, ranges), and the centre crop against torchvision's."""
    out: dict[str, Any] = {}
    for mode in TRAIN_MODES:
        t0 = time.perf_counter()
        x = to_intensity(train_batch(root, mode, None, threads))
        check_range(x, f"train mode {mode!r} (cpu)")
        out[f"train_{mode}"] = {
            "shape": list(x.shape),
            "stats": channel_stats(x),
            "seconds": time.perf_counter() - t0,
        }
    for mode in VAL_MODES:
        t0 = time.perf_counter()
        views = val_batch(root, mode, None, threads)
        for v in views:
            check_range(to_intensity(v), f"val mode {mode!r} (cpu)")
        out[f"val_{mode}"] = {
            "shapes": sorted({str(list(v.shape)) for v in views}),
            "seconds": time.perf_counter() - t0,
        }
    dali = to_intensity(val_batch(root, "center", None, threads)[0])
    out["center_vs_torchvision"] = compare_pixels(
        dali, torchvision_center(root), tol, "centre crop, DALI cpu vs torchvision"
    )
    return out


def mixed_vs_cpu(root: str, device_id: int, threads: int, tol: Tolerance) -> dict[str, Any]:
    """Every mode with ``mixed`` decode on GPU ``device_id`` against the all-CPU pipeline."""
    out: dict[str, Any] = {}
    for mode in VAL_MODES:
        gpu = val_batch(root, mode, device_id, threads)
        cpu = val_batch(root, mode, None, threads)
        diffs = [compare_pixels(to_intensity(g), to_intensity(c), tol, f"val mode {mode!r}, mixed vs cpu")
                 for g, c in zip(gpu, cpu, strict=True)]  # fmt: skip
        out[f"val_{mode}"] = {
            "views": len(diffs),
            "mean_abs": max(d["mean_abs"] for d in diffs),
            "p99_abs": max(d["p99_abs"] for d in diffs),
            "max_abs": max(d["max_abs"] for d in diffs),
        }
    for mode in TRAIN_MODES:
        g = train_batch(root, mode, device_id, threads)
        c = train_batch(root, mode, None, threads)
        if g.dtype != c.dtype:
            raise CheckFailed(f"train mode {mode!r}: dtype {g.dtype} (mixed) vs {c.dtype} (cpu)")
        bound = tol.random_stats if mode == "inception" else tol.stats
        out[f"train_{mode}"] = compare_stats(
            to_intensity(g), to_intensity(c), bound, f"train mode {mode!r}, mixed vs cpu"
        )
    return out
