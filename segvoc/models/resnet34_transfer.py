"""5b transfer learning (report Table 2): frozen ImageNet ResNet34 encoder + the baseline's decoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet34_Weights, resnet34

from segvoc.errors import WeightsError
from segvoc.models.base import SegmentationModel, conv_act_bn, xavier_init

WEIGHTS_HELP = (
    "pass model.weights=/path/to/resnet34-b627a593.pth, put that file in $TORCH_HOME/hub/checkpoints, "
    "or use model.weights=none"
)


def load_resnet34_state(weights: str) -> dict[str, torch.Tensor] | None:
    """State dict for ``weights``: ``imagenet`` (torchvision IMAGENET1K_V1, cached in TORCH_HOME), ``none``,
    or a path to a saved ResNet34 state dict. Failures raise a one-line ``WeightsError``."""
    if weights in (None, "none"):
        return None
    if weights == "imagenet":
        try:
            return ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=False)
        except Exception as exc:  # offline: URLError, socket errors, ... all mean the same to the user
            raise WeightsError(
                f"cannot get ImageNet ResNet34 weights ({type(exc).__name__}); {WEIGHTS_HELP}"
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; {WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable state dict ({type(exc).__name__}); {WEIGHTS_HELP}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    expected = resnet34().state_dict()
    if not isinstance(state, dict) or not all(
        k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items() if k.startswith("layer4")
    ):
        raise WeightsError(f"{path}: not a ResNet34 state dict (keys/shapes differ); {WEIGHTS_HELP}")
    return state


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
        state = load_resnet34_state(weights)
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

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder(self.encode(x)))
