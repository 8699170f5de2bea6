"""The paper's ImageNet networks (He et al. 2015, Table 1) as pure ``nn.Module``s.

    from pipeline.models.resnet import resnet
    model = resnet(50)                     # option B, stride in the first 1x1 (the paper's v1)
    model = resnet(50, v1_5=True)          # stride in the 3x3 (torchvision's form)
    model = resnet(34, shortcut="A")       # zero-padding identity shortcuts
    model = resnet(34, plain=True)         # plain-34: the same stack without any shortcut

Module and parameter names follow torchvision (``conv1``, ``layer1.0.bn2``, ``fc``) except
that the shortcut is called ``shortcut`` rather than ``downsample``: with option C it
projects without downsampling. ``from_torchvision_state_dict`` maps the one difference.
The blocks, shortcuts and initialisation here are shared with the CIFAR-10 family
(``pipeline.models.cifar``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = ("A", "B", "C")

# Table 1: block type and blocks per stage (conv2_x .. conv5_x) for each depth.
IMAGENET_STAGES: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every conv has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity, subsampled by ``stride`` and zero-padded to the new width.

    Adds no parameters, which is why the paper's Table 2 ResNets have exactly as many
    parameters as their plain twins.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot shrink {in_channels} channels to {out_channels}")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            # A 3x3/pad-1 or 1x1 conv with this stride samples the same positions.
            x = x[:, :, :: self.stride, :: self.stride]
        # The pad tuple runs from the last dim backwards: (W, W, H, H, C-before, C-after).
        return F.pad(x, [0, 0, 0, 0, 0, self.extra_channels])

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(option: Shortcut, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The shortcut of one residual block under the paper's options A, B or C (Sec. 3.3).

    Args:
        option: "A" zero-padding identity; "B" projection only where the shape changes;
            "C" projection in every block.
        in_channels: channels entering the block.
        out_channels: channels leaving the block.
        stride: the block's spatial stride.
    """
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; choose one of {', '.join(SHORTCUTS)}")
    changes_shape = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and changes_shape):
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    if not changes_shape:
        return nn.Identity()
    return ZeroPadShortcut(in_channels, out_channels, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets); ``shortcut=None`` makes it plain."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        shortcut: Shortcut | None = "B",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if shortcut is None else make_shortcut(shortcut, in_channels, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out += self.shortcut(x)  # in place, as torchvision: no extra activation-sized buffer per block
        return self.relu(out)  # the paper's ReLU comes after the addition

    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm that closes the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152); ``shortcut=None`` makes it plain.

    The paper (v1) strides in the first 1x1; v1.5 (torchvision, NVIDIA) strides in the 3x3,
    which costs about 7% more multiply-adds and is reported to train to slightly higher accuracy.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        shortcut: Shortcut | None = "B",
        v1_5: bool = False,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width, 1 if v1_5 else stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride if v1_5 else 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            None if shortcut is None else make_shortcut(shortcut, in_channels, out_channels, stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out += self.shortcut(x)  # in place, as torchvision: no extra activation-sized buffer per block
        return self.relu(out)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm that closes the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3


Block = type[BasicBlock] | type[Bottleneck]
BLOCKS: dict[str, Block] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(
    block: Block,
    in_channels: int,
    width: int,
    num_blocks: int,
    stride: int,
    shortcut: Shortcut | None,
    v1_5: bool = False,
) -> tuple[nn.Sequential, int]:
    """``num_blocks`` blocks of one width; the first one carries the stride.

    Args:
        block: BasicBlock or Bottleneck.
        in_channels: channels entering the stage.
        width: the blocks' inner width (a bottleneck outputs 4x this).
        num_blocks: blocks in the stage.
        stride: spatial stride of the first block.
        shortcut: "A", "B", "C", or None for a plain stage.
        v1_5: bottlenecks stride in the 3x3 instead of the first 1x1 (a basic block has its
            stride in the first 3x3 in both forms).

    Returns:
        The stage and its number of output channels.
    """
    extra = {"v1_5": v1_5} if block is Bottleneck else {}
    blocks = []
    for i in range(num_blocks):
        blocks.append(block(in_channels, width, stride if i == 0 else 1, shortcut, **extra))
        in_channels = width * block.expansion
    return nn.Sequential(*blocks), in_channels


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He initialisation (the paper's ref. [13]) for convs; BN starts as the identity.

    ``nn.Linear`` keeps PyTorch's default, as torchvision does: the paper does not say.

    Args:
        model: any network built from this module's blocks.
        zero_init_residual: zero the last BN gamma of every residual branch so each block
            starts as the identity (Goyal et al. 2017); helps large-batch training.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        if any(b.shortcut is None for b in blocks):
            # Zeroing a plain block's last BN would cut the signal: there is no shortcut to carry it.
            raise ValueError("zero_init_residual needs residual blocks; a plain network has none")
        for b in blocks:
            nn.init.zeros_(b.last_bn().weight)


class ResNet(nn.Module):
    """The ImageNet family: 7x7/2 stem, 3x3/2 max-pool, four stages, average pool, fc.

    Args:
        block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152).
        layers: blocks in each of the four stages, e.g. (3, 4, 6, 3).
        num_classes: outputs of the final fc layer.
        shortcut: "A", "B" or "C" (ignored when ``plain``).
        v1_5: bottlenecks stride in the 3x3 (torchvision) rather than the first 1x1 (paper).
        plain: no shortcuts at all (the paper's plain baselines).
        zero_init_residual: zero the last BN gamma in each residual branch.
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        num_classes: int = 1000,
        shortcut: Shortcut = "B",
        v1_5: bool = False,
        plain: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must give four positive block counts, got {list(layers)}")
        block_cls = BLOCKS[block]
        option = None if plain else shortcut
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        self.layer1, channels = make_stage(block_cls, channels, 64, layers[0], 1, option, v1_5)
        self.layer2, channels = make_stage(block_cls, channels, 128, layers[1], 2, option, v1_5)
        self.layer3, channels = make_stage(block_cls, channels, 256, layers[2], 2, option, v1_5)
        self.layer4, channels = make_stage(block_cls, channels, 512, layers[3], 2, option, v1_5)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(
    depth: int,
    num_classes: int = 1000,
    shortcut: Shortcut = "B",
    v1_5: bool = False,
    plain: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """A network of Table 1 by depth (18, 34, 50, 101, 152), residual or plain.

    Args:
        depth: one of 18, 34, 50, 101, 152.
        num_classes: outputs of the final fc layer.
        shortcut: "A", "B" (the paper's default for 50/101/152) or "C".
        v1_5: stride in the bottleneck's 3x3 instead of its first 1x1 (no effect on 18/34).
        plain: the plain twin, without shortcuts.
        zero_init_residual: zero the last BN gamma in each residual branch.
    """
    if depth not in IMAGENET_STAGES:
        raise ValueError(
            f"no ImageNet ResNet of depth {depth}; choose one of {', '.join(map(str, IMAGENET_STAGES))}"
        )
    block, layers = IMAGENET_STAGES[depth]
    return ResNet(block, layers, num_classes, shortcut, v1_5, plain, zero_init_residual)


def from_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet state dict to this module's names.

    torchvision's resnet18/34 equal ``resnet18``/``resnet34`` here (option B); its
    resnet50/101/152 are v1.5, so they equal ``resnet(depth, v1_5=True)`` (``resnet50_v1_5``).
    The only renamed key part is ``downsample`` -> ``shortcut``.

    Args:
        state_dict: ``torchvision.models.resnetXX(...).state_dict()`` or a loaded checkpoint.

    Returns:
        A new dict for ``model.load_state_dict``.
    """
    return {key.replace(".downsample.", ".shortcut."): value for key, value in state_dict.items()}
