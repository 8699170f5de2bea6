"""DALI ImageNet pipelines on CPU: the test protocols against torchvision, training augmentation,
and the sharding guarantees DDP relies on (equal steps, disjoint shards, every val image once)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.config.schema import ResolutionSchedule
from pipeline.data.constants import IMAGENET_MEAN, IMAGENET_STD, PCA_EIGVAL, PCA_EIGVEC, PCA_SCALE
from pipeline.data.imagenet import build_train_loader, build_val_loader
from pipeline.data.layout import ImageFolderIndex
from pipeline.data.prep.synth import render_image
from pipeline.data.rank_split import rank_train_order, rank_val_range

# Small sizes keep DALI fast on two CPU cores; the geometry is the paper's (resize, then crop).
CFG = DataConfig(crop_size=56, val_resize=64, scale_min=64, scale_max=96, normalize="meanstd")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)

# (width, height): up- and downscaling and both orientations. Odd margins, greyscale and
# progressive JPEGs are in tests/test_eval_windows.py.
REF_SIZES = [(144, 96), (96, 144), (80, 64), (60, 48), (48, 72)]


def _index(files: list[str], labels: list[int] | None = None) -> ImageFolderIndex:
    labels = list(range(len(files))) if labels is None else labels
    return ImageFolderIndex(("c",), tuple(files), tuple(labels), tuple(files), tuple(labels))


def _val_loader(index, mode="center", scales=(), batch_size=2, rank=0, world_size=1):
    """A validation loader on the CPU with one DALI thread; rank ``rank`` of ``world_size``."""
    return build_val_loader(
        index, CFG, mode=mode, scales=scales, batch_size=batch_size, rank=rank, world_size=world_size,
        device_id=None, num_threads=1,
    )  # fmt: skip


def _train_loader(index, cfg=CFG, *, global_batch, seed=0, num_threads=1, **options):
    """A training loader on the CPU for a single process (rank 0 of 1); ``options`` as the builder's."""
    return build_train_loader(
        index, cfg, global_batch=global_batch, rank=0, world_size=1, device_id=None, seed=seed,
        num_threads=num_threads, **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ref_images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("ref")
    files = []
    for i, size in enumerate(REF_SIZES):
        img = render_image(i, size, np.random.default_rng(i))
        path = d / f"ref{i}.jpg"
        # 4:4:4 chroma so decoders cannot differ in chroma upsampling; only resampling is compared.
        img.save(path, quality=95, subsampling=0)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def train_images(tmp_path_factory) -> list[str]:
    """24 varied JPEGs, each its own label, so shard membership can be read off the labels."""
    d = tmp_path_factory.mktemp("train")
    files = []
    for i in range(24):
        rng = np.random.default_rng(100 + i)
        size = (int(rng.integers(70, 130)), int(rng.integers(70, 130)))
        path = d / f"t{i:02d}.JPEG"
        render_image(i % 10, size, rng).save(path, quality=90)
        files.append(str(path))
    return files


def _torchvision_reference(files: list[str], mode: str) -> torch.Tensor:
    from torchvision import transforms as T

    crop = T.CenterCrop(CFG.crop_size) if mode == "center" else T.TenCrop(CFG.crop_size)
    out = []
    for path in files:
        with Image.open(path) as im:
            crops = crop(T.Resize(CFG.val_resize)(im.convert("RGB")))  # Resize(int): shorter side, antialias
        for c in [crops] if mode == "center" else crops:
            out.append((torch.from_numpy(np.asarray(c, np.float32)).permute(2, 0, 1) - MEAN) / STD)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_val_matches_torchvision(ref_images, mode):
    loader = _val_loader(_index(ref_images), mode)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    per_sample = 10 if mode == "tencrop" else 1
    assert images.shape == (len(ref_images) * per_sample, 3, CFG.crop_size, CFG.crop_size)
    assert labels.tolist() == list(range(len(ref_images))) and labels.dtype == torch.int64
    ref = _torchvision_reference(ref_images, mode)
    # Compare in 0-255 intensity levels. DALI's antialiased linear resize and PIL's bilinear
    # resize are the same triangle filter; they differ by output rounding (+-1 level) and the odd
    # JPEG IDCT rounding, so a crop's mean difference stays well under one level. A crop taken
    # one pixel off, or a crop in the wrong TenCrop position or unflipped, differs by several
    # levels on average on these textured images - that is what the bounds catch.
    diff = ((images - ref) * STD).abs()
    per_crop = diff.mean(dim=(1, 2, 3))
    assert per_crop.max() < 0.6, per_crop
    assert torch.quantile(diff.flatten(), 0.999) <= 2.0
    assert diff.max() <= 12.0


def test_tencrop_order_is_sample_major_with_flips(ref_images):
    loader = _val_loader(_index(ref_images[:1]), "tencrop", batch_size=1)
    ((crops, labels),) = list(loader.epoch(0))
    assert crops.shape[0] == 10 and labels.tolist() == [0]
    # The second five are the mirrors of the first five's windows on the flipped image:
    # flip(tl of flipped image) == tr of the original, and so on (windows: tests/test_eval_windows.py).
    torch.testing.assert_close(crops[5].flip(-1), crops[1])  # flipped tl == original tr, mirrored
    torch.testing.assert_close(crops[9].flip(-1), crops[4])  # centre (even margins)


def test_multiscale_whole_image_per_scale(ref_images):
    scales = (48, 64)
    loader = _val_loader(_index(ref_images), "multiscale", scales)
    seen = 0
    for batch, labels in loader.epoch(0):
        assert isinstance(batch, list) and len(batch) == len(labels)
        for sample, label in zip(batch, labels.tolist(), strict=True):
            w, h = REF_SIZES[label]
            assert len(sample) == len(scales)
            for s, t in zip(scales, sample, strict=True):
                assert t.dtype == torch.float32 and t.shape[:2] == (1, 3)
                assert min(t.shape[2:]) == s
                assert abs(max(t.shape[2:]) - max(w, h) * s / min(w, h)) <= 1
        seen += len(labels)
    assert seen == len(ref_images)


# 7 images over batch 2: uneven shards and partial last batches. 8 ranks over 7 images: one rank
# has nothing and must yield nothing (not a padded sample).
@pytest.mark.parametrize(
    "mode, world", [(m, w) for m in ("center", "tencrop", "multiscale") for w in (1, 2, 3)] + [("center", 8)]
)
def test_val_every_image_exactly_once(train_images, mode, world):
    index = _index(train_images[:7])
    labels = []
    for rank in range(world):
        loader = _val_loader(index, mode, (48,), rank=rank, world_size=world)
        got = [y for _, y in loader.epoch(0)]
        assert len(got) == len(loader)
        labels += [label for y in got for label in y.tolist()]
    assert sorted(labels) == list(range(7)), (world, labels)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_val_shard_partitions(world):
    for n in (0, 1, 7, 50_000):
        parts = [rank_val_range(n, rank=r, world_size=world) for r in range(world)]
        assert sum(len(p) for p in parts) == n
        assert [i for p in parts for i in p] == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3, 5])  # 5 does not divide 12: ranks take 2, 2, 3, 2, 3 per step
def test_train_shards_equal_steps_and_disjoint(world):
    n, batch = 103, 12
    shards = [
        rank_train_order(n, global_batch=batch, rank=r, world_size=world, seed=5, epoch=2)
        for r in range(world)
    ]
    sizes = [batch * (r + 1) // world - batch * r // world for r in range(world)]
    assert [len(s) for s in shards] == [(n // batch) * k for k in sizes]  # the same steps everywhere
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat)  # disjoint, no repeats
    # The global batch at step k is the same set whatever the world size.
    step0 = sorted(np.concatenate([s[:k] for s, k in zip(shards, sizes, strict=True)]).tolist())
    assert step0 == sorted(
        rank_train_order(n, global_batch=batch, rank=0, world_size=1, seed=5, epoch=2)[:batch].tolist()
    )


def test_train_shards_change_with_the_epoch_and_need_a_sample_per_worker():
    n, batch = 103, 12
    assert not np.array_equal(
        rank_train_order(n, global_batch=batch, rank=0, world_size=1, seed=5, epoch=0),
        rank_train_order(n, global_batch=batch, rank=0, world_size=1, seed=5, epoch=1),
    )
    with pytest.raises(ValueError, match="smaller than the 16 workers"):
        rank_train_order(n, global_batch=10, rank=0, world_size=16, seed=0, epoch=0)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """``make(layout, files, cfg, **kwargs)``: a training loader over ``files`` (file i has label i) in
    the folder layout or the sharded one (``data shard`` of a tree with one class per file)."""
    from pipeline.data.prep.shard_writer import write_shards
    from pipeline.data.shard_cache import ShardCache
    from pipeline.data.shard_feed import open_sharded

    made: dict[tuple[str, ...], object] = {}

    def make(layout, files, cfg, **kwargs):
        if layout == "folder":
            return build_train_loader(_index(files), cfg, **kwargs)
        if tuple(files) not in made:
            tree = tmp_path_factory.mktemp("tree")
            for i, f in enumerate(files):
                for split in ("train", "val"):
                    (tree / split / f"c{i:02d}").mkdir(parents=True)
                    (tree / split / f"c{i:02d}" / Path(f).name).symlink_to(f)
            out = tmp_path_factory.mktemp("sharded")
            write_shards(str(tree), str(out), shard_size_mb=0.02, seed=0, workers=1, progress=None)
            made[tuple(files)] = open_sharded(replace(cfg, root=str(out)))
        source = made[tuple(files)]
        assert len(source.manifest.shard_ids("train")) > 3  # several windows of 3 shards
        cfg = replace(cfg, root=source.root, shuffle_window=3)
        return source.train_loader(cfg, ShardCache(source.manifest), **kwargs)

    return make


LAYOUTS = ["folder", "sharded"]


def _collect(loader, epoch):
    xs, ys = zip(*loader.epoch(epoch), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_train_paper_shapes_ranges_and_determinism(train_images):
    index = _index(train_images)
    kwargs = dict(global_batch=8, seed=3, num_threads=2)
    loader = _train_loader(index, **kwargs)
    assert len(loader) == 3
    x0, y0 = _collect(loader, 0)
    assert x0.shape == (24, 3, 56, 56) and x0.dtype == torch.float32
    assert y0.dtype == torch.int64 and sorted(y0.tolist()) == list(range(24))  # one full pass
    # meanstd-normalised 0-255 pixels (plus a little lighting noise) stay within these bounds.
    lo = ((0 - MEAN) / STD).min() - 0.5
    hi = ((255 - MEAN) / STD).max() + 0.5
    assert lo < x0.min() and x0.max() < hi and x0.std() > 0.3
    x0b, y0b = _collect(_train_loader(index, **kwargs), 0)  # a fresh loader: resume replays
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    x1, y1 = _collect(loader, 1)
    assert not torch.equal(y0, y1)  # new order
    order1 = torch.argsort(y1)
    assert not torch.allclose(x0[torch.argsort(y0)], x1[order1])  # new augmentation of the same images


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_train_ranks_equal_steps_disjoint_labels(train_images, layouts, layout, world):
    files = train_images[:22]  # 22 // 6 = 3 steps, 4 images dropped this epoch
    seen = []
    for rank in range(world):
        loader = layouts(
            layout, files, replace(CFG, augment="none"), global_batch=6, rank=rank, world_size=world,
            device_id=None, seed=0, num_threads=1,
        )  # fmt: skip
        batches = list(loader.epoch(4))
        assert len(batches) == len(loader) == 3
        assert all(y.shape == (6 // world,) for _, y in batches)
        seen += torch.cat([y for _, y in batches]).tolist()
    assert len(seen) == len(set(seen)) == 18


# The other augmentations, and the paper's in channels_last fp16 (what a GPU run asks for).
@pytest.mark.parametrize(
    "augment, memory, dtype",
    [
        ("inception", {}, torch.float32),
        ("none", {}, torch.float32),
        ("paper", dict(channels_last=True, half=True), torch.float16),
    ],
    ids=["inception", "none", "paper-channels-last-half"],
)
def test_train_augments_and_memory_layouts(train_images, augment, memory, dtype):
    loader = _train_loader(_index(train_images[:8]), replace(CFG, augment=augment), global_batch=4, **memory)
    for x, y in loader.epoch(0):
        assert x.shape == (4, 3, 56, 56) and y.shape == (4,) and x.dtype == dtype
        if memory:
            assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def grey_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("grey") / "grey.png"  # PNG: lossless, so the pixels are exactly 128
    Image.new("RGB", (80, 70), (128, 128, 128)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def mean_root(tmp_path_factory) -> str:
    """A dataset root whose `data stats --per-channel` file holds the ImageNet channel means, so
    that data.normalize=mean subtracts exactly IMAGENET_MEAN (and divides by nothing)."""
    from pipeline.data.prep.mean import write_mean
    from pipeline.data.stats import MeanStats

    root = tmp_path_factory.mktemp("mean-root")
    write_mean(root, MeanStats("channel", np.asarray(IMAGENET_MEAN, np.float32), CFG.crop_size, 1))
    return str(root)


def test_pca_lighting_is_alexnet_noise(grey_file, mean_root):
    """On a flat grey image every output pixel of a sample is 128 + offset - mean, and the offset
    must be eigvec @ (alpha * eigval) * 255 with alpha ~ N(0, pca_std)."""
    n, pca_std = 96, 0.1
    cfg = replace(CFG, normalize="mean", pca_std=pca_std, root=mean_root)
    loader = _train_loader(_index([grey_file] * n, [0] * n), cfg, global_batch=32, seed=1, num_threads=2)
    x, _ = _collect(loader, 0)
    assert x.std(dim=(2, 3)).max() < 1e-3  # one constant offset per image and channel
    offsets = x.mean(dim=(2, 3)) - (128 - torch.tensor(IMAGENET_MEAN))  # [n, 3]
    basis = torch.tensor(PCA_EIGVEC) * torch.tensor(PCA_EIGVAL) * PCA_SCALE  # offset = basis @ alpha
    alphas = torch.linalg.solve(basis, offsets.T).T
    assert alphas.abs().max() < 6 * pca_std
    assert 0.7 * pca_std < alphas.std() < 1.3 * pca_std

    plain = _train_loader(_index([grey_file] * 8, [0] * 8), replace(cfg, pca_std=0.0), global_batch=8, seed=1)
    xp, _ = _collect(plain, 0)
    torch.testing.assert_close(
        xp, torch.full_like(xp, 0) + (128 - torch.tensor(IMAGENET_MEAN)).view(1, 3, 1, 1)
    )


def test_synthetic_dataset_end_to_end(tmp_path: Path):
    """The writer's output goes through the layout scan and both loaders."""
    from pipeline.data.layout import scan_imagenet
    from pipeline.data.prep.synth import write_synthetic_imagenet

    write_synthetic_imagenet(tmp_path / "d", classes=3, train_per_class=4, val_per_class=2, seed=0, workers=1)
    index = scan_imagenet(tmp_path / "d")
    train = _train_loader(index, global_batch=4)
    assert sum(y.numel() for _, y in train.epoch(0)) == 12
    val = _val_loader(index, "center", batch_size=4)
    assert sorted(torch.cat([y for _, y in val.epoch(0)]).tolist()) == [0, 0, 1, 1, 2, 2]


def test_paper_crop_covers_the_scaled_window(tmp_path, mean_root):
    """'paper': the crop is c pixels of the image rescaled to shorter side S ~ U[scale_min, scale_max],
    i.e. a (c * short / S)-pixel window of the original. A horizontal ramp (R = x) makes the
    window's width readable from the output's red range."""
    w, h = 400, 300
    ramp = np.repeat(np.repeat(np.linspace(0, 255, w, dtype=np.float32)[None, :, None], h, 0), 3, 2)
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp.round().astype(np.uint8)).save(path)
    cfg = replace(CFG, normalize="mean", pca_std=0.0, root=mean_root)
    loader = _train_loader(_index([str(path)] * 32, [0] * 32), cfg, global_batch=32, num_threads=2)
    x, _ = _collect(loader, 0)
    red = x[:, 0] + IMAGENET_MEAN[0]  # back to 0-255
    span = (red[:, :, -1] - red[:, :, 0]).abs().mean(1)  # levels across the crop's width, per sample
    per_px = 255 / (w - 1)
    lo = cfg.crop_size * h / cfg.scale_max * per_px * (cfg.crop_size - 1) / cfg.crop_size
    hi = cfg.crop_size * h / cfg.scale_min * per_px
    assert (span > lo - 3).all() and (span < hi + 3).all(), (span, lo, hi)
    assert span.max() - span.min() > 0.5 * (hi - lo)  # the scale really is random
    flipped = (red[:, :, -1] < red[:, :, 0]).all(1)
    assert 4 < flipped.sum() < 28


@pytest.mark.parametrize("split", ["train", "val"])
def test_decode_failure_names_the_file(train_images, tmp_path, split):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    files = train_images[:5] + [str(bad)] + train_images[5:10]
    index = _index(files)
    if split == "train":
        loader = _train_loader(index, global_batch=4)
    else:
        loader = _val_loader(index, "center", (64,), batch_size=4)
    with pytest.raises(RuntimeError, match=r"cannot decode .*bad\.JPEG .*data verify"):
        for _ in loader.epoch(0):
            pass


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_resume_mid_epoch_and_any_world_size_replay_the_same_batches(train_images, layouts, layout):
    """The feed draws files and augmentation from (seed, epoch, step, place in the global batch):
    a loader started at step k of an epoch, or run on another world size, sees the same samples.
    On both layouts (the sharded one orders an epoch by windows of shards)."""
    common = dict(global_batch=8, device_id=None, seed=3, num_threads=1)  # 24 images: 3 steps per epoch
    one = layouts(layout, train_images, CFG, rank=0, world_size=1, **common)
    straight = list(one.epoch(0)) + list(one.epoch(1))  # one pipeline, run on across the boundary
    assert one._next == (2, 0)  # the pipeline was not rebuilt for epoch 1
    resumed = list(layouts(layout, train_images, CFG, rank=0, world_size=1, **common).epoch(1, start=1))
    for (x, y), (xr, yr) in zip(straight[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    halves = [
        list(layouts(layout, train_images, CFG, rank=r, world_size=2, **common).epoch(1)) for r in range(2)
    ]
    for step in range(3):
        x, y = straight[3 + step]
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), y)
        torch.testing.assert_close(torch.cat([halves[0][step][0], halves[1][step][0]]), x)


@pytest.mark.parametrize(
    "layout, augment", [("folder", "paper"), ("sharded", "paper"), ("folder", "inception")]
)
def test_resolution_schedule_changes_the_crop_without_a_new_pipeline(train_images, layouts, layout, augment):
    """data.res_schedule: epoch 0 at 48 px, epoch 1 at 64 px, from one pipeline run on across the
    boundary; a run resumed mid-way through epoch 1 gets 64 px and, with the paper's augmentation
    (drawn by the feed), the very same pixels."""
    cfg = replace(CFG, crop_size=48, augment=augment, res_schedule=ResolutionSchedule(64, 0, 1, 16))
    common = dict(global_batch=8, device_id=None, seed=3, num_threads=1, rank=0, world_size=1)
    one = layouts(layout, train_images, cfg, **common)
    straight = list(one.epoch(0)) + list(one.epoch(1))
    assert one._next == (2, 0)  # the pipeline was not rebuilt for epoch 1
    assert [tuple(x.shape) for x, _ in straight] == [(8, 3, 48, 48)] * 3 + [(8, 3, 64, 64)] * 3
    resumed = list(layouts(layout, train_images, cfg, **common).epoch(1, start=1))
    assert [tuple(x.shape) for x, _ in resumed] == [(8, 3, 64, 64)] * 2
    if augment == "paper":
        for (x, y), (xr, yr) in zip(straight[4:], resumed, strict=True):
            assert torch.equal(x, xr) and torch.equal(y, yr)
