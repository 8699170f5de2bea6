"""The recipes: each loads, passes the config checks and holds its source's settings as
docs/recipes.md maps them: FFCV's fast ResNet-50 ones (configs/imagenet/fast/, their
rn50_<N>_epochs.yaml) and torchvision's long one (configs/imagenet/long/rn50_600ep.yaml)."""

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
    # Ends that are not multiples of the step: the side stays within them and never shrinks.
    for start, end in ((160, 180), (170, 200)):
        cfg = load_config(None, [f"data.crop_size={start}", f"data.res_schedule.end_res={end}",
                                 "data.res_schedule.end_ramp=10", "data.scale_min=256"])  # fmt: skip
        sides = [cfg.data.train_crop(e) for e in range(12)]
        assert sides[0] == start and sides[-1] == end and all(start <= x <= end for x in sides)
        assert sides == sorted(sides), sides


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


# ---------------------------------------------------------------- torchvision's long recipe

LONG = "configs/imagenet/long/rn50_600ep.yaml"
IMAGENET_TRAIN = 1_281_167


def test_long_recipe_holds_torchvisions_settings():
    """configs/imagenet/long/rn50_600ep.yaml against torchvision's command (docs/recipes.md)."""
    cfg = load_config(LONG, [])
    assert (cfg.model.name, cfg.model.v1_5, cfg.model.blurpool) == ("resnet50", True, False)
    o = cfg.optim
    assert o.batch_size == 8 * 128 and o.scale_lr and o.lr * o.batch_size / 256 == pytest.approx(0.5)
    assert (o.momentum, o.weight_decay, o.no_wd_bn_bias, o.label_smoothing) == (0.9, 2e-5, True, 0.1)
    assert (o.mixup_alpha, o.cutmix_alpha, o.mix_switch_prob) == (0.2, 1.0, 0.5)
    d = cfg.data
    assert (d.augment, d.crop_size, d.auto_augment, d.random_erase) == ("inception", 176, "ta_wide", 0.1)
    assert (d.normalize, d.pca_std, d.res_schedule.end_res) == ("meanstd", 0.0, 0)
    assert (d.val_resize, d.eval_crop) == (232, 224)  # --val-resize-size 232, --val-crop-size 224
    assert (cfg.eval.mode, cfg.eval.final_mode, cfg.eval.flip) == ("center", "center", False)
    s = cfg.schedule
    assert (s.kind, s.warmup_epochs, s.epochs, s.max_iters) == ("cosine", 5, 600, None)


def test_long_recipe_lr_meets_torchvisions_at_every_epoch_start():
    """Theirs: LinearLR(start_factor=0.01 (--lr-warmup-decay), total_iters=5) then CosineAnnealingLR(
    T_max=595), both stepped once per epoch; ours moves every iteration and meets theirs at each
    epoch's first iteration, on their 8 GPUs."""
    from pipeline.train.derived import derive
    from pipeline.train.schedule import ScheduleState, learning_rate

    cfg = load_config(LONG, [])
    dv = derive(cfg, IMAGENET_TRAIN, world_size=8)
    assert (dv.lr, dv.iters_per_epoch, dv.total_iters) == (pytest.approx(0.5), 1251, 600 * 1251)

    def theirs(epoch: int) -> float:
        if epoch < 5:
            return 0.5 * (0.01 + (1 - 0.01) * epoch / 5)
        return 0.5 * 0.5 * (1 + np.cos(np.pi * (epoch - 5) / (600 - 5)))

    state = ScheduleState()
    for epoch in list(range(12)) + [100, 300, 599]:
        ours = learning_rate(cfg.schedule, base_lr=dv.lr, it=epoch * 1251, iters_per_epoch=1251,
                             total_iters=dv.total_iters, state=state)  # fmt: skip
        assert ours == pytest.approx(theirs(epoch), rel=1e-9, abs=1e-12), epoch


def test_long_recipe_ema_decay_is_torchvisions_per_step():
    """train.py: adjust = world_size * batch_size * model_ema_steps / epochs; alpha = min(1, (1 -
    model_ema_decay) * adjust); decay 1 - alpha per update, one update every model_ema_steps steps."""
    adjust = 8 * 128 * 32 / 600
    per_update = 1.0 - min(1.0, (1.0 - 0.99998) * adjust)
    ema = load_config(LONG, []).optim
    assert ema.ema_decay**32 == pytest.approx(per_update, rel=1e-7) and ema.ema_warmup
    assert ema.ema_decay == pytest.approx(per_update ** (1 / 32), abs=5e-9)  # written to 8 places


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (["data.random_erase=1.5"], "data.random_erase", "[0, 1]"),
        (["data.random_erase=-0.1"], "data.random_erase", "[0, 1]"),
        (["data.augment=none", "data.random_erase=0.1"], "data.random_erase", "augment=none"),
        (["data.augment=none", "data.auto_augment=ta_wide"], "data.auto_augment", "augment=none"),
        (["data.dataset=cifar10", "data.auto_augment=ta_wide"], "data.auto_augment", "cifar10"),
        (["data.auto_augment=ra"], "data.auto_augment", "ta_wide"),
    ],
)
def test_torchvision_augment_config_errors_name_the_key(overrides, key, says):
    with pytest.raises(ConfigError, match=key) as e:
        load_config(None, overrides)
    assert says in str(e.value)


def test_the_docs_set_torchvisions_figure_beside_none_of_ours():
    text = (ROOT / "docs" / "recipes.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `long/rn50_600ep.yaml`"))
    assert "80.858 %" in row and "measured: none yet" in row, row
