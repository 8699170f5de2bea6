"""Evaluation: top-k counts, 10-crop averaging, exact across world sizes, the eval command, the
training images in eval mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline, tiny_overrides

from pipeline.config import load_config, to_dict
from pipeline.train.evaluate import evaluate, topk_correct

CPU = torch.device("cpu")
MODES = {
    "center": [],
    "tencrop": [],
    "multiscale": ["eval.scales=[48, 56, 64]"],
}


@pytest.fixture(scope="module")
def trained(tiny_imagenet, tmp_path_factory) -> tuple[list[str], Path]:
    """Overrides and the last checkpoint of a 2-epoch single-process run."""
    from pipeline.train.loop import train_worker

    storage = tmp_path_factory.mktemp("eval-runs")
    overrides = tiny_overrides(tiny_imagenet, storage, "evalsrc") + ["schedule.epochs=2", "eval.batch_size=6"]
    summary = train_worker(to_dict(load_config(None, overrides + ["cluster.num_workers=1"])))
    return overrides, Path(summary["checkpoint"])


def test_topk_counts():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    top1, top5 = topk_correct(scores, labels)
    assert (top1.item(), top5.item()) == (1, 3)  # top-5 clamps to the 3 classes


def test_tencrop_averages_softmax_over_crops():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # crop k of each image votes for class k % 2
            k = torch.arange(x.shape[0]) % 10
            return torch.stack([(k % 2 == 0).float() * 10, (k % 2 == 1).float() * 10], dim=1)

    images = torch.zeros(20, 3, 4, 4)  # 2 images x 10 crops
    labels = torch.tensor([0, 1])
    out = evaluate(Fixed(), [(images, labels)], mode="tencrop", device=torch.device("cpu"))
    # a 5/5 split: averaged probabilities tie and topk picks class 0 -> image 0 right, image 1 wrong
    assert out["val/images"] == 2 and out["val/top1_err"] == 50.0


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_eval_equals_one_process(trained, tmp_path, local_ray):
    """For every mode, 2 Ray workers (each scoring its shard) give exactly the 1-process counts."""
    from pipeline.driver.eval_cmd import eval_worker
    from pipeline.driver.ray_runner import run_on_ray

    overrides, checkpoint = trained

    def mode_config(mode: str, workers: int) -> dict:
        return to_dict(
            load_config(
                None, overrides + [f"cluster.num_workers={workers}", f"eval.mode={mode}", *MODES[mode]]
            )
        )

    def all_modes_worker(loop_config: dict) -> None:  # pickled by value: one Ray run scores every mode
        import ray.train

        for mode in MODES:
            record = eval_worker(mode_config(mode, 2), str(checkpoint), under_ray=True)
            if ray.train.get_context().get_world_rank() == 0:  # one machine here: a file is fine
                (tmp_path / f"two-{mode}.json").write_text(json.dumps(record))

    run_on_ray(
        load_config(None, overrides + ["cluster.num_workers=2"]), worker=all_modes_worker, name="eval-modes"
    )
    for mode in MODES:
        single = eval_worker(mode_config(mode, 1), str(checkpoint))
        double = json.loads((tmp_path / f"two-{mode}.json").read_text())
        assert double["world_size"] == 2 and single["world_size"] == 1, mode
        assert double["images"] == single["images"] == 16, mode
        assert double["top1_err"] == single["top1_err"], mode
        assert double["top5_err"] == single["top5_err"], mode


@pytest.mark.slow
def test_eval_command_writes_json(trained, tmp_path):
    overrides, checkpoint = trained
    out = tmp_path / "result.json"
    proc = run_pipeline(
        "eval",
        "--config",
        "configs/demo.yaml",
        "--checkpoint",
        str(checkpoint),
        "--no-ray",
        "--out",
        str(out),
        *overrides,
        "cluster.num_workers=1",
        "eval.mode=tencrop",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["eval_mode"] == "tencrop" and record["images"] == 16
    assert 0 <= record["top1_err"] <= 100 and record["top5_err"] == 0.0

    bad = run_pipeline(
        "eval",
        "--config",
        "configs/demo.yaml",
        "--checkpoint",
        str(tmp_path),
        *overrides,
        timeout=120,
    )
    assert bad.returncode == 2 and "no checkpoint state here" in bad.stderr


def test_train_eval_is_on_for_cifar_and_off_for_imagenet_unless_set():
    from pipeline.train.evaluate import train_eval_on

    assert train_eval_on(load_config("configs/cifar10/resnet20.yaml"))
    assert not train_eval_on(load_config("configs/cifar10/resnet20.yaml", ["eval.train_eval=false"]))
    assert not train_eval_on(load_config("configs/imagenet/resnet34.yaml"))
    assert train_eval_on(load_config("configs/imagenet/resnet34.yaml", ["eval.train_eval=true"]))


def test_imagenet_training_images_in_eval_mode_are_every_training_file_once(tiny_imagenet, tmp_path):
    from conftest import tiny_overrides

    from pipeline.data.source import open_dataset

    cfg = load_config(None, [*tiny_overrides(tiny_imagenet, tmp_path), "eval.train_eval=true"])
    source = open_dataset(cfg.data)
    labels = []
    for rank in (0, 1):
        data = source.loaders(cfg, rank=rank, world_size=2, device=CPU, num_threads=1, eval_batch=24)
        for images, y in data.make_train_eval().epoch(0):
            assert images.shape[1:] == (3, 48, 48)  # the centre crop of validation, no augmentation
            labels += y.tolist()
    assert labels == list(source.index.train_labels)
