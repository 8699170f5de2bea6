"""Evaluation loaders are built once per run and mode, and a kept loader scores every image once
in every pass.

Building a DALI pipeline takes seconds (and the sharded layout's val loader starts fetching
shards), so the training loop keeps each evaluation loader for the whole run
(``pipeline.train.setup.Run.eval_loader``). The tests count the builds over a multi-epoch run and
check that every pass over a kept loader, whatever the world size, gives each image once: the
DALI iterator resets at a pass's end and the padded last batch never leaves the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pipeline.config import load_config, to_dict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sharded(tiny_imagenet, tmp_path_factory) -> Path:
    """The tiny ImageNet in the sharded layout, several shards per split."""
    from pipeline.data.prep.shard_writer import write_shards

    out = tmp_path_factory.mktemp("eval-loaders") / "sharded"
    write_shards(str(tiny_imagenet), str(out), shard_size_mb=0.2, seed=1, workers=1, progress=None)
    return out


@pytest.mark.parametrize("layout", ["folder", "sharded"])
def test_eval_loaders_are_built_once_per_run_and_mode(
    tiny_imagenet, tiny_sharded, tmp_path, monkeypatch, layout
):
    """Two validated epochs, each also scoring the training images in eval mode (both layouts
    have them), and a final evaluation in the same mode: one pipeline per set in all."""
    import pipeline.data.dali_pipeline
    import pipeline.data.imagenet
    from pipeline.train.loop import train_worker

    builds: list[str] = []
    original = pipeline.data.dali_pipeline.build_val_pipeline

    def counted(mode, files, *args, **kwargs):
        builds.append(mode)
        return original(mode, files, *args, **kwargs)

    # imagenet.py holds its own reference to the builder; the sharded feed imports it when called.
    monkeypatch.setattr(pipeline.data.imagenet, "build_val_pipeline", counted)
    monkeypatch.setattr(pipeline.data.dali_pipeline, "build_val_pipeline", counted)
    root = tiny_imagenet if layout == "folder" else tiny_sharded
    overrides = tiny_overrides(root, tmp_path, "builds") + [
        "cluster.num_workers=1",
        "model.name=cifar_resnet20",
        "optim.batch_size=64",  # 2 steps per epoch
        "schedule.epochs=2",
        "eval.final_mode=center",
        "eval.train_eval=true",
        "tracking.mode=disabled",
    ]
    summary = train_worker(to_dict(load_config(None, overrides)))
    # Validation and the training images, once each (5 builds when built every epoch).
    assert builds == ["center"] * 2, f"{len(builds)} builds"
    assert summary["val_images"] == 16
    records = [json.loads(line) for line in (tmp_path / "builds" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("val/top1_err" in r for r in records)
    assert all("train_eval/top1_err" in r for r in records)


@pytest.mark.parametrize("mode", ["center", "tencrop", "multiscale"])
@pytest.mark.parametrize("layout", ["folder", "sharded"])
def test_a_kept_val_loader_scores_every_image_once_in_every_pass(tiny_imagenet, tiny_sharded, layout, mode):
    from pipeline.data.source import open_dataset

    root = tiny_imagenet if layout == "folder" else tiny_sharded
    cfg = load_config(None, [*tiny_overrides(root, Path("unused")), "eval.scales=[48,64]"])
    source = open_dataset(cfg.data)
    for world in (1, 3):
        # 16 images over 3 ranks (5, 5, 6) in batches of 4: every rank's last batch is padded.
        loaders = [
            source.loaders(
                cfg, rank=rank, world_size=world, device=CPU, num_threads=1, eval_batch=4
            ).make_val(mode)
            for rank in range(world)
        ]
        for _ in range(3):
            labels = [y for loader in loaders for _, ys in loader.epoch(0) for y in ys.tolist()]
            assert labels == list(source.index.val_labels), (layout, world, labels)
