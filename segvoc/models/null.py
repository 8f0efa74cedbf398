"""The ``null`` model: one 1x1 convolution, for measuring what the framework costs per step (``segvoc.bench``)."""

from __future__ import annotations

import torch
from torch import nn

from segvoc.models.base import SegmentationModel


class NullModel(SegmentationModel):
    """A single 1x1 ``Conv2d`` 3 -> ``num_classes``: a step costs almost nothing but the framework around it."""

    size_divisor = 1

    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(3, num_classes, 1)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)
