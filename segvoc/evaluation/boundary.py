"""Boundary IoU (Cheng et al., CVPR 2021) for semantic segmentation, computed on the device.

Per class, the boundary of a binary mask follows the official boundary-iou-api ``mask_to_boundary``: pad the mask
with one pixel of zeros, erode it with a 3x3 kernel ``d`` times, crop, and keep ``mask - eroded``; so pixels within
``d`` of the image border count as boundary. ``d = max(1, round(ratio * image diagonal))``. A d-fold 3x3 erosion
is one (2d+1)x(2d+1) min-pool over the zero-padded mask (done here as two separable max-pools of the complement).
Pixels labelled 255 in the truth are left out of both boundaries' counts (after extraction). Intersections and
unions are summed per class over a split; ``boundary_miou`` is their mean IoU over classes with a non-empty union.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from segvoc.data.palette import IGNORE_INDEX


def boundary_dilation(height: int, width: int, ratio: float) -> int:
    """The erosion depth d = max(1, round(ratio * diagonal)) (Python's round, as the official code)."""
    return max(1, int(round(ratio * math.sqrt(height ** 2 + width ** 2))))


def mask_boundary(masks: torch.Tensor, dilation: int) -> torch.Tensor:
    """Boolean boundary of binary masks (..., H, W): ``mask`` and not its d-fold 3x3 erosion with zeros outside."""
    shape = masks.shape
    m = masks.reshape(-1, 1, *shape[-2:]).float()
    k = 2 * dilation + 1
    outside = F.pad(1.0 - m, (dilation,) * 4, value=1.0)  # the complement, with everything outside the image set
    hit = F.max_pool2d(F.max_pool2d(outside, (k, 1), stride=1), (1, k), stride=1)  # a zero within d (Chebyshev)
    return (m.bool() & (hit > 0.5)).reshape(shape)  # in the mask, not in its erosion


def boundary_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ratio: float = 0.02,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, 2, C) int64 per image: boundary intersection and union per class, for equal-sized ``preds`` and
    ``target`` (N, H, W); no host sync."""
    n, h, w = target.shape
    d = boundary_dilation(h, w, ratio)
    valid = target != ignore_index
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    truth = target.unsqueeze(1) == classes          # 255 matches no class
    pred = preds.unsqueeze(1).long() == classes
    b = mask_boundary(torch.cat([truth, pred]), d)
    bt, bp = b[:n] & valid.unsqueeze(1), b[n:] & valid.unsqueeze(1)
    inter = (bt & bp).sum((2, 3))
    union = (bt | bp).sum((2, 3))
    return torch.stack([inter, union], 1).long()


class BoundaryIoU(Metric):
    """Boundary intersections and unions per class over a split (summed across processes under DDP)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ratio: float = 0.02, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ratio, self.ignore_index = num_classes, ratio, ignore_index
        self.add_state("counts", default=torch.zeros(2, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def per_image(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``boundary_counts`` (N, 2, C) of a batch of equal-sized images, with this metric's settings."""
        return boundary_counts(preds, target, self.num_classes, self.ratio, self.ignore_index)

    def update(self, per_image: torch.Tensor) -> None:
        """Adds the per-image counts (N, 2, C) of a batch (``per_image``)."""
        self.counts += per_image.sum(0)

    def compute(self) -> torch.Tensor:
        return self.counts


def boundary_scores_from_counts(counts: torch.Tensor) -> dict:
    """``boundary_miou`` (float, NaN when no union) and ``per_class_boundary_iou`` (None where the union is
    empty) from (2, C) intersection/union counts."""
    c = counts.detach().double().cpu()
    inter, union = c[0], c[1]
    iou = [float(i / u) if u > 0 else None for i, u in zip(inter.tolist(), union.tolist(), strict=True)]
    defined = [v for v in iou if v is not None]
    return {"boundary_miou": sum(defined) / len(defined) if defined else float("nan"),
            "per_class_boundary_iou": iou}
