"""Test-time flip (``eval.flip``) and the test crop's config (``data.val_crop``): the centre
crop and its mirror scored, softmax scores averaged; the keys checked before anything runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.train.evaluate import evaluate


def test_flip_averages_the_scores_of_the_crop_and_its_mirror():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 5)
    ).eval()  # no pooling before the linear layer: a mirrored image scores differently
    images, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    with torch.no_grad():
        probs = (model(images).softmax(1) + model(images.flip(dims=[3])).softmax(1)) / 2
    want_top1 = 100.0 * (1 - (probs.argmax(1) == labels).float().mean().item())
    want_loss = F.nll_loss(probs.log(), labels).item()
    got = evaluate(model, [(images, labels)], mode="center", device=torch.device("cpu"), flip=True)
    plain = evaluate(model, [(images, labels)], mode="center", device=torch.device("cpu"))
    assert got["val/top1_err"] == pytest.approx(want_top1) and got["val/loss"] == pytest.approx(want_loss)
    assert got["val/loss"] != plain["val/loss"]  # the mirror was scored


def test_the_keys_are_checked():
    cfg = load_config(None, ["data.val_crop=256", "data.val_resize=292", "eval.flip=true"])
    assert cfg.data.eval_crop == 256 and load_config(None, []).data.eval_crop == 224
    with pytest.raises(ConfigError, match=r"data.val_resize \(256\) must be at least data.val_crop \(288\)"):
        load_config(None, ["data.val_crop=288"])
    with pytest.raises(ConfigError, match="eval.flip: the test-time flip of centre evaluation"):
        load_config(None, ["eval.flip=true", "eval.mode=tencrop", "eval.final_mode=tencrop"])
    with pytest.raises(ConfigError, match="data.val_crop: 0"):
        load_config("configs/cifar10/resnet20.yaml", ["data.val_crop=30"])
