"""4a baseline FCN (report 3.1): 5 strided convs 3->512, 5 transposed convs 512->32, 1x1 classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segvoc.models.base import SegmentationModel, conv_act_bn, xavier_init


class FCNBaseline(SegmentationModel):
    """Report 3.1, layer by layer (each block: conv -> ReLU -> BatchNorm):

    | #    | layer            | in -> out  | kernel | stride | padding |
    |------|------------------|------------|--------|--------|---------|
    | 1-5  | Conv2d           | 3->32->64->128->256->512 | 3 | 2 | 1 |
    | 6-10 | ConvTranspose2d  | 512->512->256->128->64->32 | 3 | 2 | 1 (output_padding 1) |
    | 11   | Conv2d classifier| 32->21     | 1      | 1      | 0       |
    """

    size_divisor = 32

    def __init__(self, num_classes: int = 21, encoder_channels: Sequence[int] = (32, 64, 128, 256, 512),
                 decoder_channels: Sequence[int] = (512, 256, 128, 64, 32)) -> None:
        super().__init__()
        self.num_classes = num_classes
        enc_in = [3, *encoder_channels[:-1]]
        self.encoder = nn.Sequential(*[conv_act_bn(i, o) for i, o in zip(enc_in, encoder_channels, strict=True)])
        dec_in = [encoder_channels[-1], *decoder_channels[:-1]]
        self.decoder = nn.Sequential(
            *[conv_act_bn(i, o, transposed=True) for i, o in zip(dec_in, decoder_channels, strict=True)]
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        xavier_init(self)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder(self.encoder(x)))
