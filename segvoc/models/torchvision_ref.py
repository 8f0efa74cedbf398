"""Reference rows beyond the report: torchvision's FCN-ResNet50 and DeepLabV3-ResNet50."""

from __future__ import annotations

import torch
from torchvision.models import resnet50
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

from segvoc.models.base import SegmentationModel
from segvoc.models.weights import load_backbone_state

_BUILDERS = {"fcn_resnet50": fcn_resnet50, "deeplabv3_resnet50": deeplabv3_resnet50}


class TorchvisionSegmenter(SegmentationModel):
    """torchvision segmentation model (dilated ResNet50, output stride 8) with an ImageNet backbone.

    In training with ``aux_loss`` the output is ``{"out", "aux"}`` (the task adds ``loss.aux_weight`` x aux CE);
    in eval it is the main logits only. Heads keep torchvision's own initialisation.
    """

    size_divisor = 8

    def __init__(self, arch: str = "deeplabv3_resnet50", num_classes: int = 21, weights: str = "imagenet",
                 aux_loss: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = _BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
        state = load_backbone_state(weights, "resnet50")
        if state is not None:
            backbone_keys = set(resnet50().state_dict()) - {"fc.weight", "fc.bias"}
            self.net.backbone.load_state_dict({k: v for k, v in state.items() if k in backbone_keys}, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        out = self.net(x)  # torchvision upsamples to the input size itself
        if self.training and "aux" in out:
            return {"out": out["out"][..., :h, :w], "aux": out["aux"][..., :h, :w]}
        return out["out"]

