"""Losses (``conf/loss``): pixel-wise cross-entropy, optionally class-weighted, with an auxiliary-head term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segvoc.data.palette import IGNORE_INDEX


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy ignoring 255; ``weight`` is a buffer so it travels in checkpoints."""

    def __init__(self, num_classes: int = 21, weight: torch.Tensor | Sequence[float] | None = None,
                 ignore_index: int = IGNORE_INDEX, weighted: bool | None = None, aux_weight: float = 0.5) -> None:
        super().__init__()
        w = torch.ones(num_classes) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", w.float())
        self.ignore_index = ignore_index
        # weighted=True with weight=None: the weights arrive later with a checkpoint's state dict
        self.weighted = weight is not None if weighted is None else weighted
        self.aux_weight = aux_weight

    def forward(self, logits: torch.Tensor | dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """CE of ``logits`` (N,C,H,W); for ``{"out", "aux"}`` outputs adds ``aux_weight`` x CE of ``aux``."""
        if isinstance(logits, dict):
            loss = self(logits["out"], target)
            if "aux" in logits and self.aux_weight:
                loss = loss + self.aux_weight * self(logits["aux"], target)
            return loss
        return F.cross_entropy(logits, target.long(), weight=self.weight if self.weighted else None,
                               ignore_index=self.ignore_index)
