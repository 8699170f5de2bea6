"""The fast-recipe keys in training: the EMA of the weights (its arithmetic, its metrics, its
checkpoint) and MixUp / CutMix, exact across a mid-epoch stop and resume, without host syncs.

The runs here train a CIFAR-10 ResNet-20 in this process on a generated archive (no DALI, no Ray).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from torch import nn

from pipeline.config import dump_yaml, load_config, to_dict
from pipeline.data.prep import cli
from pipeline.driver import eval_cmd
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import init_context
from pipeline.train.ema import WeightAverage, ema_decay
from pipeline.train.loop import train_one_epoch, train_worker
from pipeline.train.setup import TrainingProgress, setup_run

RECIPE = ["optim.ema_decay=0.9", "optim.ema_warmup=true", "optim.mixup_alpha=0.2", "optim.cutmix_alpha=1.0"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    assert (
        cli.main(["synth-cifar", "--out", str(root), "--train-per-class", "20", "--test-per-class", "4"]) == 0
    )
    return root


def cifar_overrides(root, storage, name: str) -> list[str]:
    """200 training images in batches of 32: 6 steps an epoch, seconds on a CPU."""
    return [
        f"name={name}",
        "data.dataset=cifar10",
        f"data.root={root}",
        "data.crop_size=32",
        "data.pca_std=0",
        "data.normalize=mean",
        "model.name=cifar_resnet20",
        "model.num_classes=10",
        "optim.batch_size=32",
        "optim.scale_lr=false",
        "schedule.kind=cosine",
        "schedule.epochs=2",
        "eval.mode=center",
        "eval.final_mode=center",
        "cluster.num_workers=1",
        "cluster.use_gpu=false",
        "tracking.mode=disabled",
        "log_every_n_steps=1000",
        f"checkpoint.storage_path={storage}",
    ]


def test_ema_decay_and_its_warmup():
    assert ema_decay(0.9999, False, 0) == 0.9999
    assert ema_decay(0.9999, True, 0) == 1 / 10  # (1 + 0) / (10 + 0)
    assert ema_decay(0.9999, True, 8) == 9 / 18
    assert ema_decay(0.99, True, 10**6) == 0.99  # the warm-up's rule passes the decay, which caps it


def test_ema_update_is_the_lerp_of_weights_and_bn_statistics():
    live = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
    average = WeightAverage(live, decay=0.75)
    with torch.no_grad():  # every value and 0.75 / 0.25 are exact in binary: the result is too
        average.module[0].weight.fill_(1.0)  # not the random init: lerp rounds as 0.75 a + 0.25 b may not
        live[0].weight.fill_(3.0)
        live[1].running_mean.fill_(-2.0)
        live[1].running_var.fill_(5.0)
        live[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in average.state_dict().items()}
    average.update(live, updates=100)
    after = average.state_dict()
    assert before["0.weight"].eq(1.0).all()
    assert after["0.weight"].eq(0.75 * 1.0 + 0.25 * 3.0).all()  # 1.5
    assert after["1.weight"].eq(1.0).all() and after["1.bias"].eq(0.0).all()  # equal on both sides
    assert after["1.running_mean"].eq(0.75 * 0.0 + 0.25 * -2.0).all()  # -0.5
    assert after["1.running_var"].eq(0.75 * 1.0 + 0.25 * 5.0).all()  # 2.0
    assert after["1.num_batches_tracked"] == 7  # the integer counter is copied
    assert not any(p.requires_grad for p in average.module.parameters())
    # With the warm-up, the first update keeps a tenth of the old average: (1 + 0) / (10 + 0).
    warm = WeightAverage(live, decay=0.9999, warmup=True)
    with torch.no_grad():
        warm.module[1].running_mean.fill_(10.0)
    warm.update(live, updates=0)
    torch.testing.assert_close(warm.state_dict()["1.running_mean"], torch.full((2,), 0.1 * 10.0 + 0.9 * -2.0))


def _state(run_dir, name: str) -> dict:
    return torch.load(run_dir / name / "state.pt", weights_only=True)


@pytest.mark.slow
def test_ema_and_mixing_resume_mid_epoch_bitwise(cifar_root, tmp_path):
    """An uninterrupted run, and the same run resumed from its checkpoint inside epoch 2: the same
    weights, EMA and optimizer state to the bit (the mixing draws replayed from (seed, epoch,
    step)), and the EMA scored beside the weights in metrics.jsonl and summary.json."""
    common = cifar_overrides(cifar_root, tmp_path, "straight") + RECIPE
    common += ["checkpoint.every_n_steps=4", "checkpoint.num_to_keep=20"]  # steps 4, 8 (epoch 2), ...
    summary = train_worker(to_dict(load_config(None, common)))
    straight = tmp_path / "straight"
    assert {"ema_val_top1_err", "ema_val_top5_err"} <= summary.keys()
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(
        {"val/top1_err", "val/ema_top1_err", "val/ema_top5_err", "val/ema_loss"} <= r.keys() for r in records
    )
    end = _state(straight, "checkpoint_epoch0002")
    assert end["format_version"] == 4 and end["ema"].keys() == end["model"].keys()
    assert any(
        not torch.equal(end["ema"][k], end["model"][k]) for k in end["model"]
    )  # an average, not a copy
    # The eval command scores the checkpoint's EMA (--ema) as the run's final evaluation did.
    for ema, key in ((True, "ema_val_top1_err"), (False, "val_top1_err")):
        cfg = to_dict(load_config(None, common))
        record = eval_cmd.eval_worker(cfg, str(straight / "checkpoint_epoch0002"), ema=ema)
        assert record["ema"] is ema and record["top1_err"] == summary[key]

    # The same run stopped after step 8 (the middle of epoch 2) and started again from there.
    shutil.copytree(straight, tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint_epoch0002"))
    resumed_cfg = load_config(None, [*common, "name=resumed"])
    assert (tmp_path / "resumed" / "checkpoint_epoch0001_step0000008").is_dir()
    train_worker(to_dict(resumed_cfg))
    again = _state(tmp_path / "resumed", "checkpoint_epoch0002")
    for part in ("model", "ema"):
        for key, value in end[part].items():
            assert torch.equal(again[part][key], value), (part, key)
    assert again["step"] == end["step"] == 12


def test_older_checkpoint_without_ema_starts_the_ema_at_its_weights(cifar_root, tmp_path, capsys):
    cfg = load_config(None, cifar_overrides(cifar_root, tmp_path, "old"))
    run = setup_run(cfg, init_context(False, use_gpu=False))
    folder = tmp_path / "old" / "checkpoint_epoch0001"
    ckpt.save(folder, model=run.network, optimizer=run.optimizer, scaler=run.scaler,
              progress=TrainingProgress(epoch=1, step=6), config=to_dict(cfg))  # fmt: skip
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["ema"] is None
    state.pop("ema")
    state["format_version"] = 3  # as written before the EMA existed
    torch.save(state, folder / "state.pt")
    with_ema = setup_run(load_config(None, [*cifar_overrides(cifar_root, tmp_path, "old"), *RECIPE]),
                         init_context(False, use_gpu=False))  # fmt: skip
    progress, _ = ckpt.restore(with_ema)
    assert progress.step == 6
    for key, value in with_ema.network.state_dict().items():
        assert torch.equal(with_ema.ema.state_dict()[key], value), key
    # Nor can the eval command score an EMA that is not there: it says so before any work.
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    args = ["--config", str(tmp_path / "c.yaml"), "--checkpoint", str(folder), "--no-ray"]
    assert eval_cmd.main([*args, "--ema"]) == 2
    assert "holds no EMA of the weights" in capsys.readouterr().err


def test_recipe_steps_make_no_host_sync(cifar_root, tmp_path, count_syncs):
    """EMA updates and MixUp / CutMix draws add no read of the device to a step: an epoch of 6 steps
    and one of 3 make the same reads (those at the epoch's end)."""
    cfg = load_config(None, cifar_overrides(cifar_root, tmp_path, "nosync") + RECIPE)
    run = setup_run(cfg, init_context(False, use_gpu=False))
    counts = count_syncs
    counts.clear()  # setup_run's reads

    class Quiet:
        def steps(self, metrics, step, console, track):
            pass

    steps = run.derived.iters_per_epoch
    train_one_epoch(run, 0, TrainingProgress(), Quiet())
    whole = Counter(counts)
    counts.clear()
    train_one_epoch(run, 1, TrainingProgress(epoch=1, step=steps + steps // 2), Quiet())
    assert sum(whole.values()) > 0 and whole == counts, (whole, counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA's own sync detector")
def test_recipe_steps_make_no_host_sync_on_cuda(cifar_root, tmp_path):
    """On a GPU, CUDA's own detector: a step with MixUp / CutMix draws and an EMA update raises if
    anything in it waits for the device."""
    from pipeline.train.loop import train_step
    from pipeline.train.mixing import Mixer

    overrides = cifar_overrides(cifar_root, tmp_path, "cuda") + RECIPE + ["precision.cudnn_benchmark=false"]
    cfg = load_config(None, [*overrides, "cluster.use_gpu=true", "precision.amp=bf16"])
    run = setup_run(cfg, init_context(False, use_gpu=True))
    mixer = Mixer.for_run(run)
    images, labels = next(iter(run.data.train.epoch(0)))

    def step(i: int) -> None:
        mixed_images, mixed = mixer.mix(images, labels, 0, i)
        train_step(run, mixed_images, labels, mixed)
        run.ema.update(run.network, updates=i)

    step(0)  # the first step allocates and picks kernels outside the detector
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_cifar_held_out_split_scores_the_ema_on_the_test_set_too(cifar_root, tmp_path, capsys):
    """CIFAR-10 with the paper's held-out split, a step-free schedule and an EMA: the test set is
    scored at the end with the weights and with their EMA, as the checkpoint's EMA scores it."""
    from pipeline.train.evaluate import score

    overrides = cifar_overrides(cifar_root, tmp_path, "held-out") + [
        "data.val_split=40", "optim.ema_decay=0.9", "schedule.kind=linear", "schedule.warmup_epochs=1",
    ]  # fmt: skip
    summary = train_worker(to_dict(load_config(None, overrides)))
    assert {"test_top1_err", "ema_test_top1_err", "ema_test_top5_err", "ema_val_top1_err"} <= summary.keys()
    assert "the EMA of the weights: top-1 err" in capsys.readouterr().out.split("test set (")[1]
    again = setup_run(load_config(None, overrides), init_context(False, use_gpu=False))
    ckpt.restore(again)
    assert score(again, "test", "center", weights="ema")["test/ema_top1_err"] == summary["ema_test_top1_err"]
    assert score(again, "test", "center")["test/top1_err"] == summary["test_top1_err"]
