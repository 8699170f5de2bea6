"""The model zoo: fidelity to the paper and torchvision, and every registered model runs.

    .venv/bin/python -m pytest -q tests/test_models.py

Parameter and multiply-add counts are taken on the ``meta`` device (no memory, no
arithmetic); forward/backward runs use small batches on CPU.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pipeline.__main__
import pipeline.models.cli as cli
from pipeline.config import ModelConfig
from pipeline.models import (
    MODEL_NAMES,
    BasicBlock,
    Bottleneck,
    build_model,
    count_macs,
    count_params,
    create_model,
    from_torchvision_state_dict,
    model_spec,
    native_input_size,
    summarize,
)
from pipeline.models.resnet import ZeroPadShortcut

IMAGENET_NAMES = [n for n in MODEL_NAMES if native_input_size(n) == 224]
CIFAR_NAMES = [n for n in MODEL_NAMES if native_input_size(n) == 32]


# Counting walks every model once; the CLI tests and the fidelity tests share the results.
cached_summary = functools.cache(summarize)


def meta_model(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **options)


def blocks_of(model: nn.Module) -> list[BasicBlock | Bottleneck]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


# ---------------------------------------------------------------- registry and options


def test_registry_holds_every_model_name_in_order() -> None:
    expected = (
        "resnet18 resnet34 resnet50 resnet101 resnet152 resnet18_a resnet34_a resnet34_c resnet50_v1_5 "
        "plain18 plain34 cifar_resnet20 cifar_resnet32 cifar_resnet44 cifar_resnet56 cifar_resnet110 "
        "cifar_resnet1202 cifar_plain20 cifar_plain32 cifar_plain44 cifar_plain56 cifar_plain110"
    ).split()
    assert MODEL_NAMES == tuple(expected)
    assert {native_input_size(n) for n in IMAGENET_NAMES} == {224}
    assert len(IMAGENET_NAMES) + len(CIFAR_NAMES) == len(MODEL_NAMES)


def test_unknown_model_names_the_close_match_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*did you mean 'resnet50'.*cifar_plain110"):
        build_model(ModelConfig(name="resnet5"))
    with pytest.raises(ValueError, match="unknown model"):
        native_input_size("vgg16")


def test_build_model_applies_config_options() -> None:
    with torch.device("meta"):
        c = build_model(ModelConfig(name="resnet34", shortcut="C"))
        v15 = build_model(ModelConfig(name="resnet50", v1_5=True))
        v1 = build_model(ModelConfig(name="resnet50_v1_5", v1_5=False))
        small = build_model(ModelConfig(name="cifar_resnet20", num_classes=100))
        own = build_model(ModelConfig(name="resnet34_a", shortcut=None))
    assert count_params(c) == cached_summary("resnet34_c")["params"]
    assert count_macs(v15, 224) == cached_summary("resnet50_v1_5")["macs"]
    assert count_macs(v1, 224) == cached_summary("resnet50")["macs"]
    assert small.fc.out_features == 100
    assert count_params(own) == cached_summary("resnet34_a")["params"]  # None: the model's own option


def test_plain_networks_reject_residual_options() -> None:
    with pytest.raises(ValueError, match="plain network"):
        build_model(ModelConfig(name="plain34", shortcut="B"))
    with pytest.raises(ValueError, match="plain network"):
        build_model(ModelConfig(name="cifar_plain20", zero_init_residual=True))
    with pytest.raises(ValueError, match="shortcut option"):
        create_model("resnet18", shortcut="D")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("resnet34_a", {nn.Identity, ZeroPadShortcut}),
        ("resnet34", {nn.Identity, nn.Sequential}),
        ("resnet34_c", {nn.Sequential}),
        ("plain34", {type(None)}),
        ("cifar_resnet20", {nn.Identity, ZeroPadShortcut}),
    ],
)
def test_shortcut_options(name: str, kinds: set[type]) -> None:
    model = meta_model(name)
    assert {type(b.shortcut) for b in blocks_of(model)} == kinds
    if name == "resnet34":
        # Option B projects exactly where the shape changes: once per stage from conv3_x on.
        assert sum(isinstance(b.shortcut, nn.Sequential) for b in blocks_of(model)) == 3


def test_zero_pad_shortcut_subsamples_and_pads_with_zeros() -> None:
    x = torch.randn(2, 3, 7, 7)
    out = ZeroPadShortcut(3, 8, 2)(x)
    assert out.shape == (2, 8, 4, 4)
    torch.testing.assert_close(out[:, :3], x[:, :, ::2, ::2])
    assert not out[:, 3:].any()
    # Odd maps: the subsampled identity lines up with a stride-2 3x3 branch.
    assert BasicBlock(3, 8, 2, "A")(x).shape == (2, 8, 4, 4)


def test_bottleneck_stride_placement() -> None:
    v1, v15 = meta_model("resnet50"), meta_model("resnet50_v1_5")
    assert (v1.layer2[0].conv1.stride, v1.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert (v15.layer2[0].conv1.stride, v15.layer2[0].conv2.stride) == ((1, 1), (2, 2))


def test_he_init_and_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50", zero_init_residual=True)
    w = model.conv1.weight  # 64 x 3 x 7 x 7: fan_out = 64 * 49
    assert w.std().item() == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.05)
    for block in blocks_of(model):
        assert not block.bn3.weight.any()
        assert (block.bn1.weight == 1).all() and not block.bn1.bias.any()
    projections = [b.shortcut[1] for b in blocks_of(model) if isinstance(b.shortcut, nn.Sequential)]
    assert projections and all((bn.weight == 1).all() for bn in projections)
    assert all((b.bn2.weight == 1).all() for b in blocks_of(create_model("cifar_resnet20")))


# ---------------------------------------------------------------- fidelity: counts


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50_v1_5"]
)
def test_option_b_matches_torchvision_parameter_for_parameter(name: str) -> None:
    depth = int(name.removeprefix("resnet").removesuffix("_v1_5"))
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")()
    ours = meta_model(name)
    assert count_params(ours) == count_params(reference)
    mapped = {k: v.shape for k, v in from_torchvision_state_dict(reference.state_dict()).items()}
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}


def test_resnet50_parameter_count() -> None:
    assert cached_summary("resnet50")["params"] == 25_557_032


@pytest.mark.parametrize(
    ("name", "millions", "digits"),
    [
        ("cifar_resnet20", 0.27, 2),
        ("cifar_resnet32", 0.46, 2),
        ("cifar_resnet44", 0.66, 2),
        ("cifar_resnet56", 0.85, 2),
        ("cifar_resnet110", 1.7, 1),
        ("cifar_resnet1202", 19.4, 1),
    ],
)
def test_cifar_parameters_match_table6(name: str, millions: float, digits: int) -> None:
    assert round(cached_summary(name)["params"] / 1e6, digits) == millions


def test_option_a_adds_no_parameters() -> None:
    assert cached_summary("resnet34_a")["params"] == cached_summary("plain34")["params"]
    assert cached_summary("resnet18_a")["params"] == cached_summary("plain18")["params"]
    for depth in (20, 32, 44, 56, 110):
        assert (
            cached_summary(f"cifar_resnet{depth}")["params"]
            == cached_summary(f"cifar_plain{depth}")["params"]
        )


@pytest.mark.parametrize(
    ("name", "billions"),
    [("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 3.8), ("resnet101", 7.6), ("resnet152", 11.3)],
)
def test_multiply_adds_match_table1(name: str, billions: float) -> None:
    assert cached_summary(name)["macs"] / 1e9 == pytest.approx(billions, rel=0.03)


def test_table1_counts_the_v1_bottleneck() -> None:
    # Striding in the 3x3 (v1.5) runs it at 4x the positions: ~4.1G, 7.6% over Table 1's 3.8G,
    # so the paper's count is the v1 form, which is what "resnet50" builds.
    assert cached_summary("resnet50_v1_5")["macs"] / 1e9 == pytest.approx(4.09, rel=0.01)
    assert cached_summary("resnet50_v1_5")["macs"] / 1e9 > 3.8 * 1.03


def test_count_macs_restores_training_mode() -> None:
    model = create_model("cifar_resnet20")
    assert count_macs(model, 32) == cached_summary("cifar_resnet20")["macs"]
    assert model.training


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_nets_at_native_input(name: str) -> None:
    model = meta_model(name)
    assert model(torch.zeros(1, 3, 224, 224, device="meta")).shape == (1, 1000)


# ---------------------------------------------------------------- fidelity: torchvision weights


def randomize_batchnorm(model: nn.Module) -> None:
    # Fresh BN (mean 0, var 1, gamma 1, beta 0) would hide a misplaced statistic.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50_v1_5"])
def test_torchvision_weights_give_torchvision_outputs(name: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name.removesuffix("_v1_5"))()
    randomize_batchnorm(reference)
    ours = create_model(name)
    ours.load_state_dict(from_torchvision_state_dict(reference.state_dict()))  # strict: every key
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ours.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- every registered model runs


@pytest.fixture(scope="module", params=MODEL_NAMES)
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """One model at a time (pytest groups the tests by it), with a small input.

    ImageNet nets get 64x64 instead of 224x224 to keep CPU time down: the network is fully
    convolutional up to the global pool, and the 224 shape is checked on ``meta`` above.
    """
    name = request.param
    torch.manual_seed(0)
    size = 32 if native_input_size(name) == 32 else 64
    return name, create_model(name), torch.randn(2, 3, size, size)


def test_structure_bn_after_every_conv_no_dropout_depth(built) -> None:
    name, model, _ = built
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    projections = sum(
        isinstance(m, nn.Conv2d)
        for b in blocks_of(model)
        if b.shortcut is not None
        for m in b.shortcut.modules()
    )
    assert len(convs) - projections + 1 == model_spec(name).depth  # weighted layers, fc included


def test_forward_backward(built) -> None:
    name, model, x = built
    model.train().zero_grad(set_to_none=True)
    logits = model(x)
    assert logits.shape == (2, model_spec(name).num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.any() for p in model.parameters())


def test_channels_last(built) -> None:
    name, model, x = built
    model.train()
    with torch.no_grad():
        expected = model(x)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    got = last(x.to(memory_format=torch.channels_last))
    assert got.shape == expected.shape and torch.isfinite(got).all()
    # Only the summation order differs, and batch-2 BN on 2x2 maps in the last stage amplifies it.
    # Deep plain nets with batch-statistics BN are chaotic (Yang et al. 2019): there the rounding
    # difference grows layer by layer, so plain-110's outputs are not compared.
    if model_spec(name).depth <= 56 or not model_spec(name).plain:
        assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in last.parameters())


# bf16 convs run PyTorch's slow reference kernel on CPUs without AVX512-BF16 (~7 ms each even on
# tiny maps), so this test uses half-size inputs, and the backward runs on one model per block type
# and shortcut kind; every model runs the forward.
AUTOCAST_BACKWARD = {"resnet18_a", "resnet34_c", "plain18", "resnet50", "cifar_resnet20", "cifar_plain20"}


def test_autocast_bf16(built) -> None:
    name, model, x = built
    model.train().zero_grad(set_to_none=True)
    half = x[:, :, : x.shape[2] // 2, : x.shape[3] // 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(half)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    if name in AUTOCAST_BACKWARD:
        logits.float().sum().backward()
        for p in model.parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p.grad).all()


# Scripting compiles every block instance: cifar_resnet1202's 600 blocks take ~20 s.
SCRIPT_SKIPPED = {"resnet101": "resnet50", "resnet152": "resnet50", "cifar_resnet1202": "cifar_resnet110"}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript(built) -> None:
    name, model, x = built
    if name in SCRIPT_SKIPPED:
        pytest.skip(
            f"same module types as {SCRIPT_SKIPPED[name]}, which is scripted; deeper stacks only cost time"
        )
    scripted = torch.jit.script(model)
    model.train()  # batch statistics: the outputs do not depend on the running buffers
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18_a"])
def test_torch_compile_full_graph(name: str) -> None:
    # aot_eager traces forward and backward through dynamo and AOTAutograd without codegen:
    # it proves there are no graph breaks in seconds, where inductor's C++ build takes a minute.
    torch.manual_seed(0)
    model = create_model(name)
    size = 32 if native_input_size(name) == 32 else 64
    x = torch.randn(2, 3, size, size)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), model(x), rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- the `models` command


@pytest.fixture
def cached_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "summarize", cached_summary)


def test_models_command_json(cached_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline.__main__.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(MODEL_NAMES)
    assert all(set(r) == {"name", "params", "macs", "input_size"} for r in rows)
    resnet50 = next(r for r in rows if r["name"] == "resnet50")
    assert resnet50 == {"name": "resnet50", "params": 25_557_032, "macs": resnet50["macs"], "input_size": 224}
    assert {r["input_size"] for r in rows} == {224, 32}


def test_models_command_table(cached_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "model" and len(lines) == len(MODEL_NAMES) + 2
    assert len({len(line) for line in lines}) == 1  # aligned: every line the same width
    assert [line.split()[0] for line in lines[2:]] == list(MODEL_NAMES)
    assert "25,557,032" in next(line for line in lines if line.startswith("resnet50 "))
