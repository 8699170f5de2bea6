"""The fast recipes (configs/imagenet/fast/): each loads, passes the config checks and holds
FFCV's published ResNet-50 settings as docs/recipes.md maps them (their rn50_<N>_epochs.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = (16, 24, 32, 40, 88)


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


def test_the_docs_list_every_recipe_with_ffcvs_figures_and_none_of_ours():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for epochs in EPOCHS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `rn50_{epochs}ep.yaml`"))
        assert "measured: none yet" in row, row
