"""BlurPool (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again") as FFCV's ResNet-50
recipe applies it: a fixed 3x3 binomial blur before every strided convolution.

    model = apply_blurpool(resnet(50))      # what model.blurpool: true builds

A strided convolution samples every other position, so detail finer than the new grid aliases
into it; low-pass filtering first removes most of that. As in FFCV, the convolutions blurred are
the strided ones with at least 16 input channels: every first block of stages 2-4 (its strided
conv and its projection shortcut), not the 7x7 stem on the RGB image, nor the max-pool, nor
option A's subsampled identity (no convolution). The filter is fixed (a buffer, not a parameter),
so the parameter count is unchanged; each blur costs 9 multiply-adds per input element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# FFCV's rule: the stem sees 3 channels and is left as it is.
MIN_IN_CHANNELS = 16


def blur_kernel() -> Tensor:
    """The 3x3 binomial filter [1 2 1]^T [1 2 1] / 16; every entry is exact in float32 and bf16."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return torch.outer(row, row) / 16.0


def blur(x: Tensor, kernel: Tensor) -> Tensor:
    """Each channel of ``x`` [B, C, H, W] convolved with ``kernel`` [C, 1, 3, 3], stride 1, zero
    padding 1 (FFCV's; the image border is darkened a little, the size kept)."""
    return F.conv2d(x, kernel.to(x.dtype), padding=1, groups=x.shape[1])


class BlurConv2d(nn.Conv2d):
    """A ``Conv2d`` that blurs its input first. A subclass rather than a wrapper, so parameter names
    (``layer2.0.conv1.weight``), He initialisation and checkpoints stay those of the plain conv; the
    filter is a non-persistent buffer and never enters a state dict."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kernel = blur_kernel().to(self.weight.device).expand(self.in_channels, 1, 3, 3).contiguous()
        self.register_buffer("blur_filter", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(blur(x, self.blur_filter))


def _blurred_copy(conv: nn.Conv2d) -> BlurConv2d:
    new = BlurConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.weight = conv.weight  # the same Parameter: its initialisation is kept
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def apply_blurpool(model: nn.Module) -> nn.Module:
    """``model`` with each strided ``Conv2d`` of at least ``MIN_IN_CHANNELS`` inputs replaced by a
    ``BlurConv2d`` holding the same weights; returns ``model`` (changed in place)."""
    for name, child in model.named_children():
        if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= MIN_IN_CHANNELS:
            setattr(model, name, _blurred_copy(child))
        else:
            apply_blurpool(child)
    return model
