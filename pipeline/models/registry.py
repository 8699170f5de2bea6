"""Models by name, so configs, tests and ``python -m pipeline models`` iterate one list.

model = create_model("resnet50")                     # the paper's ResNet-50 (option B, v1)
model = create_model("resnet34", shortcut="C")       # same as "resnet34_c"
model = create_model("resnet50", blurpool=True)      # blur before strided convs (model.blurpool)
model = build_model(cfg.model)                       # from a ModelConfig
count_params(model), count_macs(model, native_input_size("resnet50"))
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.blurpool import apply_blurpool
from pipeline.models.cifar import cifar_resnet
from pipeline.models.resnet import SHORTCUTS, Shortcut, resnet

if TYPE_CHECKING:
    from pipeline.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """One registered network: its family, depth and the paper's options for it."""

    name: str
    family: Literal["imagenet", "cifar"]
    depth: int
    shortcut: Shortcut | None  # None: a plain network
    v1_5: bool = False

    @property
    def plain(self) -> bool:
        return self.shortcut is None

    @property
    def input_size(self) -> int:
        return 224 if self.family == "imagenet" else 32

    @property
    def num_classes(self) -> int:
        return 1000 if self.family == "imagenet" else 10


def _specs() -> dict[str, ModelSpec]:
    specs = [
        *(ModelSpec(f"resnet{d}", "imagenet", d, "B") for d in (18, 34, 50, 101, 152)),
        ModelSpec("resnet18_a", "imagenet", 18, "A"),
        ModelSpec("resnet34_a", "imagenet", 34, "A"),
        ModelSpec("resnet34_c", "imagenet", 34, "C"),
        ModelSpec("resnet50_v1_5", "imagenet", 50, "B", v1_5=True),
        ModelSpec("plain18", "imagenet", 18, None),
        ModelSpec("plain34", "imagenet", 34, None),
        *(ModelSpec(f"cifar_resnet{d}", "cifar", d, "A") for d in (20, 32, 44, 56, 110, 1202)),
        *(ModelSpec(f"cifar_plain{d}", "cifar", d, None) for d in (20, 32, 44, 56, 110)),
    ]
    return {spec.name: spec for spec in specs}


REGISTRY: dict[str, ModelSpec] = _specs()
MODEL_NAMES: tuple[str, ...] = tuple(REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registered spec of ``name``; a ValueError names the closest match and the choices.

    Args:
        name: a registered model name, e.g. "resnet50" or "cifar_resnet56".
    """
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; registered models: {', '.join(MODEL_NAMES)}")


def native_input_size(name: str) -> int:
    """Side of the square input the model was designed for: 224 (ImageNet) or 32 (CIFAR-10).

    Args:
        name: a registered model name.
    """
    return model_spec(name).input_size


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    shortcut: Shortcut | None = None,
    v1_5: bool | None = None,
    zero_init_residual: bool = False,
    blurpool: bool = False,
) -> nn.Module:
    """Build a registered network, optionally overriding its options.

    Args:
        name: a registered model name (see ``MODEL_NAMES``).
        num_classes: outputs of the fc layer; None: 1000 for ImageNet nets, 10 for CIFAR nets.
        shortcut: "A", "B" or "C"; None: the registered model's own option.
        v1_5: stride in the bottleneck's 3x3 rather than its first 1x1; None: the model's own.
            Basic-block networks are the same either way.
        zero_init_residual: zero the last BN gamma in each residual branch.
        blurpool: a fixed 3x3 blur before each strided conv (``pipeline.models.blurpool``);
            ImageNet networks only.
    """
    spec = model_spec(name)
    if blurpool and spec.family == "cifar":
        raise ValueError(f"{name} is a CIFAR-10 network; blurpool is for the ImageNet networks")
    if spec.plain and shortcut is not None:
        raise ValueError(f"{name} is a plain network (no shortcuts); leave model.shortcut unset (null)")
    if spec.plain and zero_init_residual:
        raise ValueError(f"{name} is a plain network; zero_init_residual needs residual branches")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
    option = shortcut or spec.shortcut or "B"  # "B" is a placeholder: plain nets ignore it
    classes = spec.num_classes if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes must be positive, got {classes}")
    if spec.family == "cifar":
        return cifar_resnet(spec.depth, classes, option, spec.plain, zero_init_residual)
    v1_5 = spec.v1_5 if v1_5 is None else v1_5
    model = resnet(spec.depth, classes, option, v1_5, spec.plain, zero_init_residual)
    return apply_blurpool(model) if blurpool else model


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network a run's ``model:`` section describes.

    Args:
        cfg: ``pipeline.config.ModelConfig``; ``shortcut``/``v1_5`` set to None keep the
            registered model's own choice.
    """
    return create_model(
        cfg.name,
        num_classes=cfg.num_classes,
        shortcut=cfg.shortcut,
        v1_5=cfg.v1_5,
        zero_init_residual=cfg.zero_init_residual,
        blurpool=cfg.blurpool,
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (weights, biases, BN affine; not BN running statistics).

    Args:
        model: any module; works on the ``meta`` device.
    """
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass on one 3-channel image, as the paper counts them.

    Counted by PyTorch's own ``FlopCounterMode`` (convolutions and matrix products; BN,
    ReLU, pooling and additions are not counted, nor are they in the paper's Table 1),
    halved because it counts a multiply-add as two FLOPs. Runs in eval mode without
    gradients; on the ``meta`` device it costs no compute.

    Args:
        model: the network.
        input_size: side of a square input, or (height, width).
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def summarize(name: str, blurpool: bool = False) -> dict[str, int | str]:
    """``{"name", "params", "macs", "input_size"}`` of a registered model at its native input.

    Built on the ``meta`` device: no memory for weights and no arithmetic, so even
    cifar_resnet1202 and resnet152 take a fraction of a second.

    Args:
        name: a registered model name.
        blurpool: built with ``model.blurpool`` (ImageNet networks only): the blur adds multiply-adds,
            no parameters.
    """
    size = native_input_size(name)
    with torch.device("meta"):
        model = create_model(name, blurpool=blurpool)
    return {"name": name, "params": count_params(model), "macs": count_macs(model, size), "input_size": size}
