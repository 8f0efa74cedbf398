"""Segmentation networks, each a plain ``nn.Module`` (built from config by ``segvoc.engine.builders.build_model``)."""

from __future__ import annotations

from segvoc.models.base import SegmentationModel
from segvoc.models.fcn_baseline import FCNBaseline
from segvoc.models.fcn_dilated import FCNDilated
from segvoc.models.null import NullModel
from segvoc.models.resnet34_transfer import ResNet34Transfer
from segvoc.models.smp_model import SMPModel
from segvoc.models.torchvision_ref import TorchvisionSegmenter
from segvoc.models.unet import UNet

__all__ = [
    "FCNBaseline", "FCNDilated", "NullModel", "ResNet34Transfer", "SMPModel", "SegmentationModel",
    "TorchvisionSegmenter", "UNet",
]
