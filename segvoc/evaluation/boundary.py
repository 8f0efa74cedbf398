"""Boundary IoU (Cheng et al., CVPR 2021) for semantic segmentation, computed on the device.

Per class, the boundary of a binary mask follows the official boundary-iou-api ``mask_to_boundary``: pad the mask
with one pixel of zeros, erode it with a 3x3 kernel ``d`` times, crop, and keep ``mask - eroded``; so pixels within
``d`` of the image border count as boundary. ``d = max(1, round(ratio * image diagonal))``. A d-fold 3x3 erosion
is one (2d+1)x(2d+1) min-pool over the zero-padded mask; for all classes at once, see ``label_boundary``.
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


def label_boundary(labels: torch.Tensor, dilation: int) -> torch.Tensor:
    """Boolean (N, H, W): pixels of a label map (N, H, W) with another label, or the image's outside, within
    Chebyshev distance ``dilation``. For every class c, ``label_boundary(labels, d) & (labels == c)`` is the
    boundary of the binary mask ``labels == c`` (``mask_to_boundary``): a pixel of c survives the d-fold erosion
    exactly when its whole (2d+1)x(2d+1) window, clipped to the zero-padded image, holds c, i.e. when the window's
    maximum and minimum both equal c. One map for all classes: two separable max-pools, not one per class."""
    k = 2 * dilation + 1
    x = labels.unsqueeze(1).float()
    pad = (dilation,) * 4

    def window_max(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.max_pool2d(t, (k, 1), stride=1), (1, k), stride=1)

    high = window_max(F.pad(x, pad, value=-1.0))    # outside: -1, never the maximum of a class ...
    low = -window_max(F.pad(-x, pad, value=1.0))    # ... but always the minimum (-1 < every label)
    return ((high != x) | (low != x)).squeeze(1)


def boundary_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ratio: float = 0.02,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, 2, C) int64 per image: boundary intersection and union per class, for equal-sized ``preds`` and
    ``target`` (N, H, W); no host sync."""
    n, h, w = target.shape
    d = boundary_dilation(h, w, ratio)
    target, preds = target.long(), preds.long()
    valid = target != ignore_index
    b = label_boundary(torch.cat([target, preds]), d)
    bt, bp = b[:n] & valid, b[n:] & valid          # 255 is no class: its pixels are in no truth boundary
    image = torch.arange(n, device=target.device).view(-1, 1, 1) * num_classes
    spare = torch.full_like(target, n * num_classes)
    size = n * num_classes + 1

    def count(where: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        idx = torch.where(where, image + label, spare).reshape(-1)
        return torch.bincount(idx, minlength=size)[:-1].reshape(n, num_classes)

    inter = count(bt & bp & (target == preds), target)
    union = count(bt, target) + count(bp, preds) - inter
    return torch.stack([inter, union], 1)


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
