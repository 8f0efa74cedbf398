"""5a "own architecture" (report Table 1): deeper FCN with dilated convs, LeakyReLU and dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segvoc.models.base import GlobalAvgPool, SegmentationModel, conv_act_bn, xavier_init


class FCNDilated(SegmentationModel):
    """Report Table 1 (each conv: conv -> LeakyReLU -> BatchNorm, as in the baseline):

    | #     | layer           | in -> out | kernel | stride | padding | dilation |
    |-------|-----------------|-----------|--------|--------|---------|----------|
    | 1-5   | Conv2d          | 3->32->64->128->256->512 | 3 | 2 | 1 | 1 |
    | 6     | Conv2d          | 512->1024 | 3 | 1 | 1 | 1 |
    | 7-9   | Conv2d          | 1024->1024 | 3 | 1 | 2, 4, 6 | 2, 4, 6 |
    | 10-14 | ConvTranspose2d | 1024->1024->512->256->128->64 | 3 | 2 | 1 (output_padding 1) | 1 |
    | 15    | Dropout(0.5), then 1x1 classifier 64->21 |

    The report's discussion (5.3.1) also mentions skip connections and global context; both are flags,
    off by default (= Table 1). ``skip_connections`` adds 1x1-projected encoder features to the decoder
    at equal stride; ``global_context`` adds an image-pooled 1x1 branch after the dilated block.
    """

    size_divisor = 32

    def __init__(self, num_classes: int = 21, encoder_channels: Sequence[int] = (32, 64, 128, 256, 512),
                 bottleneck_channels: int = 1024, dilations: Sequence[int] = (2, 4, 6),
                 decoder_channels: Sequence[int] = (1024, 512, 256, 128, 64), dropout: float = 0.5,
                 negative_slope: float = 0.01, skip_connections: bool = False, global_context: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes

        def act(inplace: bool = True) -> nn.Module:
            return nn.LeakyReLU(negative_slope, inplace=inplace)

        enc_in = [3, *encoder_channels[:-1]]
        self.encoder = nn.ModuleList(
            [conv_act_bn(i, o, act=act) for i, o in zip(enc_in, encoder_channels, strict=True)]
        )
        self.widen = conv_act_bn(encoder_channels[-1], bottleneck_channels, act=act, stride=1)
        self.dilated = nn.Sequential(
            *[conv_act_bn(bottleneck_channels, bottleneck_channels, act=act, stride=1, dilation=d) for d in dilations]
        )
        self.context = (
            nn.Sequential(GlobalAvgPool(), nn.Conv2d(bottleneck_channels, bottleneck_channels, 1), act())
            if global_context else None
        )
        dec_in = [bottleneck_channels, *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            [conv_act_bn(i, o, act=act, transposed=True) for i, o in zip(dec_in, decoder_channels, strict=True)]
        )
        # decoder stage k outputs stride 32 / 2^(k+1); encoder stage 3-k has the same stride (k = 0..3)
        self.skips = (
            nn.ModuleList([nn.Conv2d(encoder_channels[3 - k], decoder_channels[k], 1) for k in range(4)])
            if skip_connections else None
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        xavier_init(self)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        x = self.dilated(self.widen(x))
        if self.context is not None:
            x = x + self.context(x)
        for k, block in enumerate(self.decoder):
            x = block(x)
            if self.skips is not None and k < len(self.skips):
                x = x + self.skips[k](feats[3 - k])
        return self.classifier(self.dropout(x))

