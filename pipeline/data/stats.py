"""The training set's mean as training reads it, for ``data.normalize: mean`` (the paper's
"per-pixel mean subtracted"): ``ROOT/train_mean.npz``, written once by ``python -m pipeline data
stats`` (``pipeline.data.prep.mean``), read and checked against the crop size here, and what the
DALI pipelines subtract: the mean image from every crop of its size, its channel means from views
of any other size (the multi-scale test, another test crop, a growing training crop). CIFAR-10
needs no file: its loader computes the per-pixel mean of the 32x32 training images itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.layout import DataLayoutError
from pipeline.store import locations

MEAN_FILE = "train_mean.npz"
KINDS = ("pixel", "channel")


@dataclass(frozen=True)
class MeanStats:
    """A training-set mean as stored in ``train_mean.npz`` (0-255 scale, RGB)."""

    kind: str  # "pixel": an HWC image of crop_size x crop_size; "channel": three values
    mean: np.ndarray  # [crop, crop, 3] or [3], float32
    crop_size: int
    images: int  # how many training images it averages

    @property
    def channel_mean(self) -> np.ndarray:
        return self.mean if self.kind == "channel" else self.mean.mean(axis=(0, 1))


def mean_path(root: str | Path) -> str:
    """``ROOT/train_mean.npz``: beside the data, a local folder or a URI."""
    root = str(root)
    return locations.join(root if locations.is_uri(root) else str(Path(root).expanduser()), MEAN_FILE)


def load_mean(root: str | Path, crop_size: int) -> MeanStats:
    """The mean stored beside the data, checked against the config's crop size.

    Raises:
        DataLayoutError: no file (the message gives the command that writes it), an unreadable
            file, or a per-pixel mean of another crop size.
    """
    path = mean_path(root)
    command = f"python -m pipeline data stats {root} --crop-size {crop_size}"
    try:
        data = locations.read_bytes(path)
    except OSError as e:
        raise DataLayoutError(f"{path}: cannot be read ({e}); {locations.access_hint(path)}") from None
    if data is None:
        raise DataLayoutError(
            f"{path}: no training-set mean. data.normalize=mean subtracts the mean of the training images, "
            f"computed once by `{command}` (add --per-channel for three channel means); "
            "or set data.normalize=meanstd"
        )
    try:
        with np.load(io.BytesIO(data)) as f:
            stats = MeanStats(
                str(f["kind"]), f["mean"].astype(np.float32), int(f["crop_size"]), int(f["images"])
            )
    except (OSError, KeyError, ValueError) as e:
        raise DataLayoutError(f"{path}: cannot be read ({e}); write it again with `{command}`") from None
    expected = (crop_size, crop_size, 3) if stats.kind == "pixel" else (3,)
    if stats.kind not in KINDS or stats.mean.shape != expected:
        raise DataLayoutError(
            f"{path}: a {stats.kind} mean of shape {stats.mean.shape} does not fit data.crop_size={crop_size} "
            f"(expected {expected}); write it again with `{command}`"
        )
    return stats


# ---------------------------------------------------------------- in the DALI graphs


def pipeline_means(
    cfg, mode: str, channels_last: bool, imagenet_mean: tuple[float, ...]
) -> tuple[list[float], np.ndarray | None]:
    """What a DALI pipeline subtracts: (per-channel mean for crop_mirror_normalize, mean image or None).

    ``meanstd``: the fixed ImageNet channel means (divided by the stds there). ``mean``: the file
    beside the data; a per-pixel mean is subtracted from every crop after crop_mirror_normalize
    (whose channel mean is then 0), laid out like the output (CHW or HWC); the multi-scale test's
    views have any size, a test crop of ``data.val_crop`` and the crops of ``data.res_schedule``
    others, so those subtract the mean image's channel means instead.

    Args:
        cfg: the data section (normalize, root, crop_size).
        mode: the pipeline mode.
        channels_last: HWC outputs instead of CHW.
        imagenet_mean: the fixed channel means for ``meanstd``.
    """
    if cfg.normalize != "mean":
        return list(imagenet_mean), None
    stats = load_mean(cfg.root, cfg.crop_size)
    # Views of another size than the mean image: the multi-scale test's, a test crop of data.val_crop,
    # training crops that grow (data.res_schedule).
    other_size = (
        mode == "multiscale"
        or (mode in ("center", "tencrop") and cfg.eval_crop != cfg.crop_size)
        # training crops that grow: training and every test view alike, so both subtract the same
        or cfg.res_schedule.end_res > 0
    )
    if stats.kind == "channel" or other_size:
        return stats.channel_mean.tolist(), None
    image = stats.mean if channels_last else np.ascontiguousarray(stats.mean.transpose(2, 0, 1))
    return [0.0, 0.0, 0.0], image


def subtract_pixel_mean(images, image: np.ndarray, *, half: bool, on_gpu: bool):
    """``images`` (float32 crops, or [10, ...] stacks of them) minus the mean image, then float16 if
    ``half`` (DALI's arithmetic takes no float16 on the CPU)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    out = images - types.Constant(image.astype(np.float32), device="gpu" if on_gpu else "cpu")
    return fn.cast(out, dtype=types.FLOAT16) if half else out
