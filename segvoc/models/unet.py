"""5c U-Net (report Table 3 and discussion 5.3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segvoc.models.base import SegmentationModel, xavier_init


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two [Conv2d 3x3 p1 -> BatchNorm -> ReLU] (discussion 5.3.3 adds the BatchNorm to Table 3's blocks)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(SegmentationModel):
    """Report Table 3:

    | #     | layer | in -> out | kernel | stride |
    |-------|-------|-----------|--------|--------|
    | x1-x5 | encoding block: 2 x (Conv2d -> BN -> ReLU) | 3->64->128->256->512->1024 | 3 (p1) | 1 |
    | 1-4   | MaxPool between encoding blocks | - | 2 | 2 |
    | y1-y4 | ConvTranspose2d + concat skip x4..x1 + double conv | 1024->512->256->128->64 | 2 / 3 | 2 / 1 |
    | y5    | Conv2d classifier, no activation | 64->21 | 1 | 1 |

    Where this follows the discussion rather than the table: the table lists a 5th MaxPool after x5 and a
    ReLU on the classifier. A 5th pool would leave y1's output at half the size of x4 (the concat fails) and
    a ReLU would clip logits at 0, so both are left out, as in Ronneberger et al. The pools use stride 2
    (the table's "stride 1" would not downsample). BatchNorm follows the discussion (5.3.3).
    """

    size_divisor = 16

    def __init__(self, num_classes: int = 21, channels: Sequence[int] = (64, 128, 256, 512, 1024)) -> None:
        super().__init__()
        self.num_classes = num_classes
        ins = [3, *channels[:-1]]
        self.down = nn.ModuleList([double_conv(i, o) for i, o in zip(ins, channels, strict=True)])
        self.pool = nn.MaxPool2d(2, 2)
        rev = list(reversed(channels))
        self.up = nn.ModuleList([nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in rev[:-1]])
        self.up_conv = nn.ModuleList([double_conv(c, c // 2) for c in rev[:-1]])
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)
        xavier_init(self)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x)
            if k < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.classifier(x)
