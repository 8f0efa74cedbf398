"""Modern reference rows: any segmentation_models_pytorch architecture with a (pretrained) encoder."""

from __future__ import annotations

import torch

from segvoc.errors import ConfigError, WeightsError
from segvoc.extras import require
from segvoc.models.base import SegmentationModel


class SMPModel(SegmentationModel):
    """``smp.create_model(arch, encoder_name=encoder, encoder_weights=..., classes=num_classes)``: for example
    ``Unet`` + ``resnet34`` with ImageNet weights is the modern version of the report's 5b/5c.

    ============  ==============================================================
    arch          Unet, UnetPlusPlus, FPN, PSPNet, DeepLabV3, DeepLabV3Plus, ...
    encoder       resnet34 (default), resnet50, efficientnet-b0, ... (smp encoders)
    weights       imagenet (downloaded by smp from the Hugging Face hub) | none
    ============  ==============================================================

    Inputs are padded to a multiple of 32 (what smp's encoders need) and the logits cropped back.
    """

    size_divisor = 32

    def __init__(self, arch: str = "Unet", encoder: str = "resnet34", encoder_weights: str = "imagenet",
                 num_classes: int = 21) -> None:
        super().__init__()
        smp = require("smp", "model=smp")
        self.num_classes = num_classes
        weights = None if encoder_weights in (None, "none") else encoder_weights
        try:
            self.net = smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, classes=num_classes)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"model.arch={arch} model.encoder={encoder}: not an smp model ({str(exc)[:120]}); "
                              "see segmentation_models_pytorch's list of architectures and encoders") from None
        except Exception as exc:  # offline: hub/network errors come in many types; all have the same fix
            raise WeightsError(f"cannot get {encoder_weights} weights for smp encoder {encoder} "
                               f"({type(exc).__name__}); run once online to cache them, or use "
                               "model.encoder_weights=none") from None

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
