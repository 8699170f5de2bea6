"""The paper's CIFAR-10 networks (He et al. 2015, Sec. 4.2): 6n+2 layers on 32x32 images.

    from pipeline.models.cifar import cifar_resnet
    model = cifar_resnet(56)               # n = 9, option A shortcuts, 0.85M parameters
    model = cifar_resnet(56, plain=True)   # plain-56, the degradation experiment

A 3x3 conv with 16 filters, then three stages of 2n 3x3 layers (n basic blocks) with
16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps, global average pool, 10-way fc.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models.resnet import BasicBlock, Shortcut, conv3x3, init_weights, make_stage


class CifarResNet(nn.Module):
    """A 6n+2-layer network of basic blocks.

    Args:
        n: basic blocks per stage (depth = 6n + 2).
        num_classes: outputs of the final fc layer.
        shortcut: "A" (the paper's choice on CIFAR), "B" or "C" (ignored when ``plain``).
        plain: no shortcuts at all.
        zero_init_residual: zero the last BN gamma in each residual branch.
    """

    def __init__(
        self,
        n: int,
        num_classes: int = 10,
        shortcut: Shortcut = "A",
        plain: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        option = None if plain else shortcut
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, channels = make_stage(BasicBlock, 16, 16, n, 1, option)
        self.layer2, channels = make_stage(BasicBlock, channels, 32, n, 2, option)
        self.layer3, channels = make_stage(BasicBlock, channels, 64, n, 2, option)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    shortcut: Shortcut = "A",
    plain: bool = False,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """A CIFAR-10 network by depth 6n+2 (20, 32, 44, 56, 110, 1202 in the paper; any n works).

    Args:
        depth: total weighted layers, 6n + 2.
        num_classes: outputs of the final fc layer.
        shortcut: "A", "B" or "C".
        plain: the plain twin, without shortcuts.
        zero_init_residual: zero the last BN gamma in each residual branch.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...), got depth {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, shortcut, plain, zero_init_residual)
