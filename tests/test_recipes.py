"""The fast recipes (configs/imagenet/fast/): each loads, passes the config checks and holds
FFCV's published ResNet-50 settings as docs/recipes.md maps them (their rn50_<N>_epochs.yaml)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = (16, 24, 32, 40, 88)
# Their resolution.start_ramp and end_ramp (rn50_<N>_epochs.yaml); min_res 160, max_res 192.
RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 88: (65, 76)}


def ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """FFCV's get_resolution (ffcv-imagenet's train_imagenet.py), as they wrote it."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("epochs", EPOCHS)
def test_recipe_holds_ffcvs_settings(epochs):
    cfg = load_config(f"configs/imagenet/fast/rn50_{epochs}ep.yaml", [])
    assert (cfg.model.name, cfg.model.v1_5, cfg.model.blurpool) == ("resnet50", True, True)
    assert (
        cfg.optim.batch_size == 4096
        and cfg.optim.lr * 4096 / 256 == pytest.approx(1.7)
        and cfg.optim.scale_lr
    )
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.label_smoothing) == (0.9, 1e-4, 0.1)
    assert cfg.optim.no_wd_bn_bias
    s = cfg.schedule
    assert (s.kind, s.warmup_epochs, s.epochs, s.max_iters) == ("linear", 2, epochs, None)
    assert s.warmup_lr == pytest.approx(1e-4 * 1.7)
    d = cfg.data
    assert (d.augment, d.crop_size, d.normalize, d.pca_std) == ("inception", 160, "meanstd", 0.0)
    assert (d.val_resize, d.eval_crop) == (293, 256) and abs(256 / 293 - 224 / 256) < 0.002
    assert (cfg.eval.mode, cfg.eval.final_mode, cfg.eval.flip) == ("center", "center", True)
    start, end = RAMPS[epochs]
    assert [d.train_crop(e) for e in range(epochs)] == [
        ffcv_resolution(e, 160, 192, end, start) for e in range(epochs)
    ]
    assert d.train_crop(0) == 160 and d.train_crop(epochs - 1) == 192


def test_resolution_rule_on_other_ramps_and_steps():
    """Ramps that pass several multiples of the step, and a step other than 32."""
    for start, end in ((0, 4), (3, 10), (2, 3)):
        cfg = load_config(None, [f"data.res_schedule.{k}={v}" for k, v in
                                 (("end_res", 288), ("start_ramp", start), ("end_ramp", end))]
                          + ["data.crop_size=128", "data.scale_min=288", "data.scale_max=400"])  # fmt: skip
        assert [cfg.data.train_crop(e) for e in range(12)] == [
            ffcv_resolution(e, 128, 288, end, start) for e in range(12)
        ]
    cfg = load_config(None, ["data.res_schedule.end_res=192", "data.res_schedule.end_ramp=4",
                             "data.res_schedule.step=16", "data.crop_size=128", "data.scale_min=192"])  # fmt: skip
    assert [cfg.data.train_crop(e) for e in range(6)] == [128, 144, 160, 176, 192, 192]
    assert load_config(None, []).data.train_crop(50) == 224  # off: data.crop_size throughout


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["data.res_schedule.end_res=160"], "at least data.crop_size"),
        (
            [
                "data.res_schedule.end_res=256",
                "data.res_schedule.start_ramp=3",
                "data.res_schedule.end_ramp=3",
            ],
            "start_ramp < end_ramp",
        ),
        (["data.res_schedule.end_ramp=5"], "end_res is 0"),
        (["data.res_schedule.end_res=256", "data.res_schedule.end_ramp=5", "data.augment=none"], "augment"),
        (["data.res_schedule.end_res=288", "data.res_schedule.end_ramp=5"], "data.scale_min (256)"),
        (["data.dataset=cifar10", "data.res_schedule.end_res=64", "data.res_schedule.end_ramp=5"], "cifar10"),
    ],
)
def test_resolution_schedule_config_errors_name_the_key(overrides, says):
    with pytest.raises(ConfigError, match="res_schedule") as e:
        load_config(None, overrides)
    assert says in str(e.value)


def test_the_docs_list_every_recipe_with_ffcvs_figures_and_none_of_ours():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for epochs in EPOCHS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `rn50_{epochs}ep.yaml`"))
        assert "measured: none yet" in row, row
