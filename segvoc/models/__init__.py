"""Segmentation networks, each a plain ``nn.Module``; ``build_model`` is the one place they are built."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from segvoc.models.base import SegmentationModel
from segvoc.models.fcn_baseline import FCNBaseline
from segvoc.models.fcn_dilated import FCNDilated
from segvoc.models.resnet34_transfer import ResNet34Transfer
from segvoc.models.torchvision_ref import TorchvisionSegmenter
from segvoc.models.unet import UNet


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Instantiate ``cfg`` (a ``conf/model/*.yaml`` node with ``_target_``).

    ``pretrained=False`` skips downloading/reading backbone weights (used when a checkpoint will overwrite them).
    """
    overrides: dict = {"num_classes": num_classes}
    if not pretrained and "weights" in cfg:
        overrides["weights"] = "none"
    params = {k: v for k, v in cfg.items() if k not in ("name", "sync_bn")}
    model = instantiate(params, **overrides, _convert_="all")
    if cfg.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


__all__ = [
    "FCNBaseline", "FCNDilated", "ResNet34Transfer", "SegmentationModel", "TorchvisionSegmenter", "UNet", "build_model",
]
