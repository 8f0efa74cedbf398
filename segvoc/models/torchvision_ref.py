"""Reference rows beyond the report: torchvision's FCN-ResNet50 and DeepLabV3-ResNet50."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

from segvoc.errors import WeightsError
from segvoc.models.weights import load_backbone_state, weights_help

_BUILDERS = {"fcn_resnet50": fcn_resnet50, "deeplabv3_resnet50": deeplabv3_resnet50}


class TorchvisionSegmenter(nn.Module):
    """torchvision segmentation model (dilated ResNet50, output stride 8) with an ImageNet backbone.

    Any input size works: torchvision upsamples the logits to the input size itself. In training with
    ``aux_loss`` the output is ``{"out", "aux"}`` (the task adds ``loss.aux_weight`` x aux CE); in eval it is the
    main logits only. Heads keep torchvision's own initialisation; as in torchvision's reference recipe the
    auxiliary head trains at 10x the learning rate (``param_groups``).
    """

    AUX_LR_SCALE = 10.0

    def __init__(self, arch: str = "deeplabv3_resnet50", num_classes: int = 21, weights: str = "imagenet",
                 aux_loss: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = _BUILDERS[arch](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
        state = load_backbone_state(weights, "resnet50")
        if state is not None:
            backbone_keys = set(resnet50().state_dict()) - {"fc.weight", "fc.bias"}
            try:  # strict: every backbone tensor must come from the file
                self.net.backbone.load_state_dict({k: v for k, v in state.items() if k in backbone_keys})
            except RuntimeError as exc:
                raise WeightsError(f"{weights}: does not fit the {arch} backbone ({str(exc).splitlines()[0]}); "
                                   f"{weights_help('resnet50')}") from None

    def param_groups(self) -> list[dict]:
        """Backbone + main head at the optimiser's learning rate, auxiliary head at ``AUX_LR_SCALE`` times it."""
        aux = self.net.aux_classifier
        aux_ids = {id(p) for p in aux.parameters()} if aux is not None else set()
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in aux_ids]
        groups = [{"params": main}]
        if aux is not None:
            groups.append({"params": [p for p in aux.parameters() if p.requires_grad], "lr_scale": self.AUX_LR_SCALE})
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.net(x)
        if self.training and "aux" in out:
            return {"out": out["out"], "aux": out["aux"]}
        return out["out"]
