"""Shared pieces of the report's architectures: the padded forward, conv blocks, Xavier init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationModel(nn.Module):
    """A network mapping (N,3,H,W) to logits (N,C,H,W) for any H, W.

    Inputs are zero-padded (bottom/right) to a multiple of ``size_divisor`` and logits cropped back, so
    full-resolution VOC images (about 500x375) go through stride-32 encoders unchanged.
    """

    size_divisor: int = 32
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.size_divisor, (-w) % self.size_divisor
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.segment(x)[..., :h, :w]

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an input whose sides are multiples of ``size_divisor``."""
        raise NotImplementedError


class GlobalAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(1)`` as a mean over H and W: the same values, but a backward pass that
    ``torch.use_deterministic_algorithms`` allows on CUDA (adaptive average pooling's backward raises there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


def conv_act_bn(cin: int, cout: int, act: type[nn.Module] = nn.ReLU, stride: int = 2, dilation: int = 1,
                transposed: bool = False) -> nn.Sequential:
    """The report's block: (Conv2d | ConvTranspose2d) k3 -> activation -> BatchNorm (report 3.1 order).

    Strided convs use padding 1; transposed convs double the size (stride 2, padding 1, output_padding 1);
    dilated convs use padding = dilation so the size is kept.
    """
    if transposed:
        conv: nn.Module = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    else:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)
    return nn.Sequential(conv, act(inplace=True), nn.BatchNorm2d(cout))


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform conv weights, zero biases, unit BatchNorm: the report's initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
