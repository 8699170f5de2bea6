"""CIFAR-10 on a generated archive in the real python format: reading, split, normalisation,
the paper's augmentation, and the sharding guarantees."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data.cifar import augment_batch, build_cifar_loaders, split_train_val
from pipeline.data.layout import DataLayoutError
from pipeline.data.prep import cli
from pipeline.data.prep.synth_cifar import write_synthetic_cifar

CFG = DataConfig(dataset="cifar10", normalize="mean", val_split=0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    assert (
        cli.main(["synth-cifar", "--out", str(root), "--train-per-class", "30", "--test-per-class", "7"]) == 0
    )
    return root


def _loaders(root, cfg=CFG, **kw):
    args = dict(global_batch=32, rank=0, world_size=1, device=CPU, seed=0, eval_batch_size=16)
    return build_cifar_loaders(root, cfg, **{**args, **kw})


def test_archive_is_the_real_format(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # how the CIFAR page says to read it
    assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (60, 3072)
    assert len(raw[b"labels"]) == 60 and all(0 <= y < 10 for y in raw[b"labels"])
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # how torchvision reads it
    assert meta["label_names"][0] == "airplane" and meta["num_vis"] == 3072
    again = write_synthetic_cifar(cifar_root.parent / "again", 30, 7, seed=0)
    assert (again / "test_batch").read_bytes() == (folder / "test_batch").read_bytes()  # deterministic


def test_loaders_shapes_and_counts(cifar_root):
    train, val, n, _ = _loaders(cifar_root)
    assert n == 300 and len(train) == 300 // 32
    batches = list(train.epoch(0))
    assert len(batches) == len(train)
    x, y = batches[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    vy = torch.cat([b[1] for b in val.epoch(0)])
    assert len(vy) == 70 and len(val) == 5 and torch.bincount(vy, minlength=10).tolist() == [7] * 10


def test_val_split_holds_out_fixed_images(cifar_root):
    train, val, n, test = _loaders(cifar_root, replace(CFG, val_split=50))
    assert n == 250 and sum(len(y) for _, y in val.epoch(0)) == 50
    # The test set is still scored, separately: all 70 test images, normalised like training.
    _, plain_val, _, no_test = _loaders(cifar_root)
    assert no_test is None  # without a split the test set is the validation set
    test_x = torch.cat([x for x, _ in test.epoch(0)])
    assert test_x.shape[0] == 70 and torch.equal(
        torch.cat([y for _, y in test.epoch(0)]), torch.cat([y for _, y in plain_val.epoch(0)])
    )
    torch.testing.assert_close(test_x, train.normalize(test.images))
    keep, held = split_train_val(300, 50)
    assert len(set(keep) | set(held)) == 300 and not set(keep) & set(held)
    assert np.array_equal(split_train_val(300, 50)[1], held)  # the same split every run and rank
    with pytest.raises(ValueError, match="val_split"):
        _loaders(cifar_root, replace(CFG, val_split=300))


def test_normalisation_uses_training_statistics(cifar_root):
    train, _, _, _ = _loaders(cifar_root)
    # "mean": the per-pixel mean image of the training set is subtracted (the paper's), 0-255 scale.
    assert train.normalize.mean.shape == (3, 32, 32)
    z = train.normalize(train.images).double()
    assert torch.allclose(z.mean(0), torch.zeros(3, 32, 32, dtype=torch.float64), atol=1e-3)
    assert 10 < z.std() < 255
    train_ms, _, _, _ = _loaders(cifar_root, replace(CFG, normalize="meanstd"))
    z = train_ms.normalize(train_ms.images)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(3), atol=1e-3)


def test_augment_is_pad_crop_flip():
    x = torch.randn(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g)
    padded = F.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        found = False
        for dy in range(9):
            for dx in range(9):
                window = padded[i, :, dy : dy + 32, dx : dx + 32]
                if torch.equal(out[i], window):
                    found = True
                elif torch.equal(out[i], window.flip(-1)):
                    found, flips = True, flips + 1
        assert found, i
    assert 10 < flips < 54  # about half flipped
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1)))


def test_train_determinism_and_epochs(cifar_root):
    a, _, _, _ = _loaders(cifar_root, seed=4)
    b, _, _, _ = _loaders(cifar_root, seed=4)
    xa, ya = zip(*a.epoch(3), strict=True)
    xb, yb = zip(*b.epoch(3), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(xa + ya, xb + yb, strict=True))  # a resumed epoch replays
    _, y4 = zip(*a.epoch(4), strict=True)
    assert not torch.equal(torch.cat(ya), torch.cat(y4))


def test_ranks_equal_steps_disjoint_and_val_once(cifar_root):
    from pipeline.data.rank_split import rank_train_order

    full_val = torch.cat([x for x, _ in _loaders(cifar_root)[1].epoch(0)])
    for world in (1, 2, 3):
        taken, val_parts = [], []
        for rank in range(world):
            train, val, n, _ = _loaders(cifar_root, global_batch=30, rank=rank, world_size=world)
            batches = list(train.epoch(1))
            assert len(batches) == len(train) == 10  # every rank the same number of steps
            assert all(x.shape[0] == 30 // world for x, _ in batches)
            order = rank_train_order(n, global_batch=30, rank=rank, world_size=world, seed=0, epoch=1)
            assert torch.equal(torch.cat([y for _, y in batches]), train.labels[torch.as_tensor(order)])
            taken += order.tolist()
            val_parts.append(torch.cat([x for x, _ in val.epoch(0)]))
        assert len(taken) == len(set(taken)) == 300  # disjoint shards
        assert torch.equal(torch.cat(val_parts), full_val)  # disjoint val slices, each image once


def test_missing_archive_says_what_to_do(tmp_path):
    with pytest.raises(DataLayoutError, match="synth-cifar|download"):
        _loaders(tmp_path)


def test_resumed_epoch_and_other_world_sizes_get_the_same_augmented_batches(cifar_root):
    train, _, _, _ = _loaders(cifar_root, global_batch=30)
    straight = list(train.epoch(2))
    resumed = list(_loaders(cifar_root, global_batch=30)[0].epoch(2, start=4))
    for (x, y), (xr, yr) in zip(straight[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    thirds = [list(_loaders(cifar_root, global_batch=30, rank=r, world_size=3)[0].epoch(2)) for r in range(3)]
    for step, (x, y) in enumerate(straight):
        assert torch.equal(torch.cat([t[step][0] for t in thirds]), x)
        assert torch.equal(torch.cat([t[step][1] for t in thirds]), y)


def test_augment_none_gives_the_images_as_they_are(cifar_root):
    train, _, _, _ = _loaders(cifar_root, replace(CFG, augment="none"), seed=3)
    order = torch.cat([y for _, y in train.epoch(2)])
    images = torch.cat([x for x, _ in train.epoch(2)])
    from pipeline.data.rank_split import rank_train_order

    idx = torch.as_tensor(rank_train_order(300, global_batch=32, rank=0, world_size=1, seed=3, epoch=2))
    assert torch.equal(order, train.labels[idx])
    assert torch.equal(images, train.normalize(train.images[idx]))  # no pad, crop or flip
    augmented, _, _, _ = _loaders(cifar_root, seed=3)
    assert not torch.equal(images, torch.cat([x for x, _ in augmented.epoch(2)]))


@pytest.mark.slow
def test_held_out_split_run_scores_val_and_test(cifar_root, tmp_path):
    """data.val_split > 0: each epoch validates on the held-out images, and the end scores the
    test set too; summary.json has both."""
    from pipeline.config import load_config, to_dict
    from pipeline.train.loop import train_worker

    cfg = load_config(
        "configs/cifar10/resnet20.yaml",
        [
            f"data.root={cifar_root}",
            "data.val_split=60",
            "optim.batch_size=60",
            "schedule.max_iters=4",  # 240 training images: 4 iterations, one epoch
            "cluster.use_gpu=false",
            "tracking.mode=disabled",
            f"checkpoint.storage_path={tmp_path}",
        ],
    )
    summary = train_worker(to_dict(cfg))
    assert summary["val_images"] == 60 and summary["test_images"] == 70
    for key in ("val_top1_err", "val_top5_err", "test_top1_err", "test_top5_err"):
        assert 0.0 <= summary[key] <= 100.0, key
    import json

    on_disk = json.loads((tmp_path / cfg.name / "summary.json").read_text())
    assert on_disk["test_top1_err"] == summary["test_top1_err"]
    metrics = [json.loads(line) for line in (tmp_path / cfg.name / "metrics.jsonl").read_text().splitlines()]
    assert "val/top1_err" in metrics[-1] and not any(k.startswith("test") for k in metrics[-1])
