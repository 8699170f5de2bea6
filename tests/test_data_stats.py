"""``data stats`` and ``data.normalize: mean``: the training set's mean, computed, stored beside
the data, and subtracted by the DALI pipelines (per pixel, or per channel)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.imagenet import build_train_loader, build_val_loader
from pipeline.data.layout import DataLayoutError, ImageFolderIndex
from pipeline.data.prep import cli
from pipeline.data.prep.mean import write_mean
from pipeline.data.prep.synth import write_synthetic_imagenet
from pipeline.data.stats import MEAN_FILE, MeanStats, load_mean

CROP = 24
CFG = DataConfig(crop_size=CROP, val_resize=28, scale_min=28, scale_max=32, pca_std=0.0, normalize="mean")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "data"
    write_synthetic_imagenet(root, classes=2, train_per_class=6, val_per_class=1, seed=3, workers=1)
    return root


def _pil_mean(root: Path) -> np.ndarray:
    """The reference: PIL's shorter-side resize and centre crop, averaged with the mirror images."""
    from torchvision import transforms as T

    views = []
    for path in sorted((root / "train").glob("*/*")):
        with Image.open(path) as im:
            views.append(np.asarray(T.CenterCrop(CROP)(T.Resize(CROP)(im.convert("RGB"))), np.float64))
    image = np.mean(views, axis=0)
    return (image + image[:, ::-1]) / 2


def test_stats_command_writes_the_pixel_and_channel_means(data_root, capsys):
    assert cli.main(["stats", str(data_root), "--crop-size", str(CROP), "--workers", "1"]) == 0
    assert (
        f"{data_root / MEAN_FILE}: pixel mean at {CROP}x{CROP} of 12 training images"
        in capsys.readouterr().out
    )
    stats = load_mean(data_root, CROP)
    assert stats.kind == "pixel" and stats.mean.shape == (CROP, CROP, 3) and stats.images == 12
    np.testing.assert_array_equal(stats.mean, stats.mean[:, ::-1])  # symmetric, like flipped training crops
    # DALI's and PIL's resampling differ by rounding: a small fraction of a level on the mean image.
    assert np.abs(stats.mean - _pil_mean(data_root)).mean() < 0.2

    assert cli.main(["stats", str(data_root), "--crop-size", str(CROP), "--per-channel", "--limit", "5"]) == 0
    channel = load_mean(data_root, CROP)
    assert channel.kind == "channel" and channel.mean.shape == (3,) and channel.images == 5
    assert np.all((0 < channel.mean) & (channel.mean < 255))


def test_missing_or_mismatched_mean_names_the_file_and_the_command(tmp_path):
    with pytest.raises(
        DataLayoutError, match=rf"{MEAN_FILE}: no training-set mean.*data stats {tmp_path} --crop-size 224"
    ):
        load_mean(tmp_path, 224)
    write_mean(tmp_path, MeanStats("pixel", np.zeros((32, 32, 3), np.float32), 32, 1))
    with pytest.raises(DataLayoutError, match=r"does not fit data.crop_size=224 .*--crop-size 224"):
        load_mean(tmp_path, 224)
    (tmp_path / MEAN_FILE).write_text("garbage")
    with pytest.raises(DataLayoutError, match="cannot be read"):
        load_mean(tmp_path, 32)


def test_train_preflight_stops_without_the_mean(data_root, tmp_path):
    from conftest import run_pipeline

    bare = tmp_path / "bare"
    write_synthetic_imagenet(bare, classes=2, train_per_class=2, val_per_class=1, seed=0, workers=1)
    proc = run_pipeline(
        "train",
        "--config",
        "configs/imagenet/resnet18.yaml",
        f"data.root={bare}",
        "model.num_classes=2",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bare / MEAN_FILE}: no training-set mean" in proc.stderr
    assert f"python -m pipeline data stats {bare} --crop-size 224" in proc.stderr


def _index(files: list[str]) -> ImageFolderIndex:
    labels = tuple(range(len(files)))
    return ImageFolderIndex(("c",), tuple(files), labels, tuple(files), labels)


@pytest.fixture()
def flat_grey(tmp_path) -> str:
    path = tmp_path / "grey.png"  # lossless: every pixel exactly 128 after any resize
    Image.new("RGB", (40, 30), (128, 128, 128)).save(path)
    return str(path)


def _mean_image(root: Path) -> np.ndarray:
    """A symmetric mean image that varies along both axes, stored as ROOT's mean."""
    ramp = np.linspace(10, 200, CROP, dtype=np.float32)
    rows, cols = np.meshgrid(ramp, ramp, indexing="ij")
    image = np.stack([rows, np.full_like(rows, 50.0), cols], -1)
    image = (image + image[:, ::-1]) / 2
    write_mean(root, MeanStats("pixel", image.astype(np.float32), CROP, 1))
    return image.astype(np.float32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pipelines_subtract_the_mean_image(tmp_path, flat_grey, channels_last):
    """On a flat grey image every crop is 128 minus the mean image, in training (flipped or not),
    centre and 10-crop tests; the multi-scale views subtract the image's channel means."""
    image = _mean_image(tmp_path)
    cfg = replace(CFG, root=str(tmp_path))
    expected = torch.from_numpy(128.0 - image).permute(2, 0, 1)  # CHW
    common = dict(rank=0, world_size=1, device_id=None, num_threads=1, channels_last=channels_last)
    train = build_train_loader(_index([flat_grey] * 4), cfg, global_batch=4, seed=0, **common)
    outputs = [x for x, _ in train.epoch(0)]
    for mode in ("center", "tencrop"):
        val = build_val_loader(_index([flat_grey] * 2), cfg, mode=mode, scales=(), batch_size=2, **common)
        outputs += [x for x, _ in val.epoch(0)]
    for x in outputs:
        assert x.shape[1:] == (3, CROP, CROP)
        torch.testing.assert_close(x, expected.expand_as(x), atol=1e-4, rtol=0)
    multi = build_val_loader(
        _index([flat_grey]), cfg, mode="multiscale", scales=(28,), batch_size=1, **common
    )
    (((views,), _),) = list(multi.epoch(0))
    channel = torch.from_numpy(128.0 - image.mean(axis=(0, 1))).view(1, 3, 1, 1)
    torch.testing.assert_close(views[0], channel.expand_as(views[0]), atol=1e-3, rtol=0)


def test_half_outputs_and_channel_means(tmp_path, flat_grey):
    _mean_image(tmp_path)
    cfg = replace(CFG, root=str(tmp_path))
    val = build_val_loader(
        _index([flat_grey]), cfg, mode="center", scales=(), batch_size=1, rank=0, world_size=1,
        device_id=None, num_threads=1, half=True,
    )  # fmt: skip
    ((x, _),) = list(val.epoch(0))
    assert x.dtype == torch.float16
    write_mean(tmp_path, MeanStats("channel", np.array([100.0, 50.0, 20.0], np.float32), CROP, 1))
    val = build_val_loader(  # the mean is read when a loader is built: a new one sees the new file
        _index([flat_grey]), cfg, mode="center", scales=(), batch_size=1, rank=0, world_size=1,
        device_id=None, num_threads=1,
    )  # fmt: skip
    ((x, _),) = list(val.epoch(0))
    torch.testing.assert_close(
        x.float(), torch.tensor([28.0, 78.0, 108.0]).view(1, 3, 1, 1).expand_as(x.float())
    )


def test_a_growing_training_crop_subtracts_the_same_channel_means_in_training_and_test(tmp_path):
    """With a per-pixel mean and data.res_schedule, training crops change size, so they subtract
    the mean image's channel means; the test views then do too (else training and evaluation
    would normalise differently). Without the schedule the mean image itself is subtracted."""
    from dataclasses import replace

    from pipeline.config.schema import ResolutionSchedule
    from pipeline.data.stats import pipeline_means

    rng = np.random.default_rng(0)
    write_mean(tmp_path, MeanStats("pixel", rng.uniform(0, 255, (CROP, CROP, 3)).astype(np.float32), CROP, 4))
    fixed = replace(CFG, root=str(tmp_path))
    growing = replace(fixed, scale_min=64, res_schedule=ResolutionSchedule(end_res=32, end_ramp=2, step=8))
    for mode in ("paper", "inception", "center", "tencrop"):
        channel, image = pipeline_means(fixed, mode, False, (0.0, 0.0, 0.0))
        assert image is not None and channel == [0.0, 0.0, 0.0], mode
        channel, image = pipeline_means(growing, mode, False, (0.0, 0.0, 0.0))
        assert image is None, mode
        np.testing.assert_allclose(channel, load_mean(tmp_path, CROP).channel_mean, rtol=1e-6)
