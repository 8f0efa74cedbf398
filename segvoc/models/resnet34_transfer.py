"""5b transfer learning (report Table 2): frozen ImageNet ResNet34 encoder + the baseline's decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import resnet34

from segvoc.models.base import SegmentationModel, conv_act_bn, xavier_init
from segvoc.models.weights import load_backbone_state


class ResNet34Transfer(SegmentationModel):
    """Report Table 2:

    | # | layer | in -> out | kernel | stride | padding |
    |---|-------|-----------|--------|--------|---------|
    | 1 | ResNet34 without avgpool/fc (frozen, BN in eval mode) | 3->512 | as ResNet34 | total 32 | - |
    | 2-6 | ConvTranspose2d -> ReLU -> BatchNorm | 512->512->256->128->64->32 | 3 | 2 | 1 (output_padding 1) |
    | 7 | Conv2d classifier | 32->21 | 1 | 1 | 0 |

    Only the decoder is Xavier-initialised; pretrained encoder weights are never touched. While frozen the
    encoder runs under ``torch.no_grad()`` in eval mode, so no graph or BN statistics update passes through it.
    """

    size_divisor = 32

    def __init__(self, num_classes: int = 21, weights: str = "imagenet", freeze_encoder: bool = True,
                 decoder_channels: Sequence[int] = (512, 256, 128, 64, 32)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.freeze_encoder = freeze_encoder
        backbone = resnet34()
        state = load_backbone_state(weights, "resnet34")
        if state is None:
            xavier_init(backbone)
        else:
            backbone.load_state_dict(state)
        self.encoder = nn.Sequential(*list(backbone.children())[:-2])
        dec_in = [512, *decoder_channels[:-1]]
        self.decoder = nn.Sequential(
            *[conv_act_bn(i, o, transposed=True) for i, o in zip(dec_in, decoder_channels, strict=True)]
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 1)
        xavier_init(self.decoder)
        xavier_init(self.classifier)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ResNet34Transfer:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # keep the pretrained BN statistics
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features (stride 32, 512 channels); no autograd graph when frozen."""
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(x)
        return self.encoder(x)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Logits at 32x the features' size (decoder + classifier)."""
        return self.classifier(self.decoder(features))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
