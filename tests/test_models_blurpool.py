"""BlurPool: the blur's arithmetic by hand, which convolutions it wraps, and its exact counts in the
registry and the ``models`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import pipeline.models.cli as cli
from pipeline.config import ConfigError, load_config
from pipeline.models import MODEL_NAMES, count_macs, count_params, create_model, model_spec, summarize
from pipeline.models.blurpool import BlurConv2d, blur, blur_kernel


def test_blur_of_a_4x4_image_by_hand():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # rows 1-4, 5-8, 9-12, 13-16
    # Sixteenths, each the 3x3 neighbourhood (zeros outside) weighted [1 2 1; 2 4 2; 1 2 1]:
    #   corner (0, 0): 4*1 + 2*2 + 2*5 + 1*6 = 24;  edge (0, 1): 2*1 + 4*2 + 2*3 + 1*5 + 2*6 + 1*7 = 40;
    #   inside (1, 1): 1+4+3 + 10+24+14 + 9+20+11 = 96 (a linear ramp keeps its value, 6);
    #   corner (3, 3): 1*11 + 2*12 + 2*15 + 4*16 = 129.
    sixteenths = torch.tensor(
        [[24.0, 40, 52, 45], [64, 96, 112, 92], [112, 160, 176, 140], [108, 152, 164, 129]]
    )
    got = blur(x, blur_kernel()[None, None])
    assert torch.equal(got[0, 0], sixteenths / 16)  # every value a multiple of 1/16: exact in float32
    assert torch.equal(blur_kernel(), torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    # Per channel: a second channel is blurred on its own, with the same filter.
    two = torch.cat([x, 2 * x], dim=1)
    assert torch.equal(blur(two, blur_kernel().expand(2, 1, 3, 3)), torch.cat([got, 2 * got], dim=1))


def test_blur_conv_is_the_conv_of_the_blurred_input():
    torch.manual_seed(0)
    conv = BlurConv2d(16, 8, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 16, 9, 9)
    expected = F.conv2d(blur(x, blur_kernel().expand(16, 1, 3, 3)), conv.weight, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)
    assert list(conv.state_dict()) == ["weight"]  # the filter is fixed and never saved


def test_blurpool_wraps_the_strided_convs_and_keeps_names_and_weights():
    torch.manual_seed(0)
    plain = create_model("resnet50", num_classes=10)
    torch.manual_seed(0)
    blurred = create_model("resnet50", num_classes=10, blurpool=True)
    wrapped = [name for name, m in blurred.named_modules() if isinstance(m, BlurConv2d)]
    # v1: the stride is in each first block's 1x1 conv1, and in its projection shortcut; the 7x7 stem
    # (3 input channels) is left alone, as in FFCV.
    assert wrapped == [f"layer{s}.0.{c}" for s in (2, 3, 4) for c in ("conv1", "shortcut.0")]
    assert blurred.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, blurred.state_dict()[k]) for k, v in plain.state_dict().items())
    v15 = create_model("resnet50_v1_5", blurpool=True)
    assert [n for n, m in v15.named_modules() if isinstance(m, BlurConv2d)][0] == "layer2.0.conv2"
    x = torch.randn(1, 3, 64, 64)
    blurred.eval()
    assert blurred(x).shape == (1, 10)


def test_blurpool_counts_are_exact():
    """The blur adds 9 multiply-adds per element of each blurred conv's input, and no parameters."""
    for name, (c1, c2, c3) in {"resnet18": (64, 128, 256), "resnet50": (256, 512, 1024)}.items():
        # Each blurred stage start: the conv and the shortcut each blur the block's input.
        extra = 2 * 9 * (c1 * 56 * 56 + c2 * 28 * 28 + c3 * 14 * 14)
        plain, blurred = summarize(name), summarize(name, blurpool=True)
        assert blurred["params"] == plain["params"]
        assert blurred["macs"] - plain["macs"] == extra
    assert summarize("resnet18", blurpool=True)["macs"] == 1_814_073_344 + 6_322_176
    with torch.device("meta"):
        model = create_model("resnet34_a", blurpool=True)  # option A: only conv1 of each stage start
    assert count_macs(model, 224) - summarize("resnet34_a")["macs"] == 9 * (
        64 * 56 * 56 + 128 * 28 * 28 + 256 * 14 * 14
    )
    assert count_params(model) == summarize("resnet34_a")["params"]


def test_models_command_with_blurpool(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "--blurpool"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [n for n in MODEL_NAMES if model_spec(n).family == "imagenet"]
    resnet18 = next(r for r in rows if r["name"] == "resnet18")
    assert resnet18 == {"name": "resnet18", "params": 11_689_512, "macs": 1_820_395_520, "input_size": 224}


def test_blurpool_is_for_imagenet_networks():
    with pytest.raises(ValueError, match="blurpool is for the ImageNet networks"):
        create_model("cifar_resnet20", blurpool=True)
    with pytest.raises(ConfigError, match="model.blurpool: is for the ImageNet networks"):
        load_config(
            None,
            [
                "data.dataset=cifar10",
                "model.name=cifar_resnet20",
                "eval.final_mode=center",
                "model.blurpool=true",
            ],
        )
    assert load_config(None, ["model.blurpool=true"]).model.blurpool
