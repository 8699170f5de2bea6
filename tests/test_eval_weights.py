"""``pipeline eval --weights``: a torchvision ResNet state-dict file scored by our evaluation.

The files are saved from randomly initialised torchvision models (the published ones need a
download): after loading, our network must compute torchvision's outputs exactly, and the
command must score them as ``evaluate`` scores the torchvision model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import run_pipeline, tiny_overrides

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.models.pretrained import WeightsError, read_torchvision_weights


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so that eval-mode BN is part of the comparison."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("tv_name", "overrides"),
    [
        ("resnet18", ["model.name=resnet18"]),
        ("resnet50", ["model.name=resnet50_v1_5"]),
        ("resnet50", ["model.name=resnet50", "model.v1_5=true"]),
    ],
)
def test_loaded_weights_compute_torchvisions_outputs(tmp_path, tv_name, overrides):
    torch.manual_seed(0)
    reference = _randomise_bn(getattr(torchvision.models, tv_name)(num_classes=7))
    cfg = load_config(None, [*overrides, "model.num_classes=7"])
    model = build_model(cfg.model).eval()
    model.load_state_dict(read_torchvision_weights(_save(reference, tmp_path / "w.pth"), cfg.model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
    path = _save(torchvision.models.resnet50(num_classes=7), tmp_path / "r50.pth")
    v1 = load_config(None, ["model.name=resnet50", "model.num_classes=7"])
    with pytest.raises(WeightsError, match="v1 ResNet-50.*set model.name=resnet50_v1_5"):
        read_torchvision_weights(path, v1.model)
    wrong_classes = load_config(None, ["model.name=resnet50_v1_5"])
    with pytest.raises(
        WeightsError, match=r"fc.weight: file \(7, 2048\) vs model \(1000, 2048\).*num_classes=7"
    ):
        read_torchvision_weights(path, wrong_classes.model)
    r34 = load_config(None, ["model.name=resnet34", "model.num_classes=7"])
    with pytest.raises(WeightsError, match=r"missing keys: \['layer1.2.bn1.bias'"):
        read_torchvision_weights(
            _save(torchvision.models.resnet18(num_classes=7), tmp_path / "r18.pth"), r34.model
        )
    with pytest.raises(WeightsError, match="ImageNet only"):
        read_torchvision_weights(path, load_config(None, ["model.name=plain34"]).model)
    (tmp_path / "junk.pth").write_text("not a torch file")
    with pytest.raises(WeightsError, match="junk.pth: cannot be read"):
        read_torchvision_weights(tmp_path / "junk.pth", load_config(None, ["model.name=resnet18"]).model)


@pytest.mark.slow
def test_eval_command_scores_torchvision_weights(tiny_imagenet, tmp_path):
    from pipeline.data.source import open_dataset
    from pipeline.train.evaluate import evaluate

    torch.manual_seed(1)
    reference = _randomise_bn(torchvision.models.resnet18(num_classes=4))
    weights = _save(reference, tmp_path / "resnet18-random.pth")
    overrides = tiny_overrides(tiny_imagenet, tmp_path / "runs") + [
        "cluster.num_workers=1",
        "eval.mode=tencrop",
    ]
    proc = run_pipeline(
        "eval", "--config", "configs/demo.yaml", "--weights", str(weights), "--no-ray", *overrides
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(Path(f"{weights}.eval-tencrop.json").read_text())
    assert record["weights"] == str(weights) and record["checkpoint"] is None and record["images"] == 16

    # The same loader and scoring applied to torchvision's own module give the same numbers.
    cfg = load_config("configs/demo.yaml", overrides)
    loaders = open_dataset(cfg.data).loaders(
        cfg, rank=0, world_size=1, device=torch.device("cpu"), num_threads=1, eval_batch=4
    )
    expected = evaluate(
        reference, loaders.make_val("tencrop").epoch(0), mode="tencrop", device=torch.device("cpu")
    )
    assert record["top1_err"] == pytest.approx(expected["val/top1_err"])
    assert record["top5_err"] == pytest.approx(expected["val/top5_err"])
    assert record["loss"] == pytest.approx(expected["val/loss"], rel=1e-5)


def test_eval_command_needs_exactly_one_source_and_meanstd(tiny_imagenet, tmp_path, capsys):
    from pipeline.driver import eval_cmd as evaluate_cli

    weights = _save(torchvision.models.resnet18(num_classes=4), tmp_path / "w.pth")
    overrides = tiny_overrides(tiny_imagenet, tmp_path / "runs")
    with pytest.raises(SystemExit) as both:
        evaluate_cli.main(
            ["--config", "configs/demo.yaml", "--weights", str(weights), "--checkpoint", "x", *overrides]
        )
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as neither:
        evaluate_cli.main(["--config", "configs/demo.yaml", *overrides])
    assert neither.value.code == 2
    assert "one of the arguments --checkpoint --weights is required" in capsys.readouterr().err
    args = ["--config", "configs/demo.yaml", "--weights", str(weights), *overrides, "data.normalize=mean"]
    assert evaluate_cli.main(args) == 2
    assert "Set data.normalize=meanstd" in capsys.readouterr().err
