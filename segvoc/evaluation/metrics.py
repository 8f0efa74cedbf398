"""The one metric implementation: a dataset-level confusion matrix and the scores derived from it.

Convention (as mmsegmentation's ``IoUMetric`` and torchvision's references): pixels labelled 255 are
ignored; IoU_c = TP / (TP + FP + FN); mIoU averages over classes whose union is non-empty, so a class absent
from both prediction and ground truth is excluded (neither 0 nor 1); pixel accuracy = correct / valid pixels;
mean class accuracy averages recall over classes present in the ground truth.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from segvoc.data.palette import IGNORE_INDEX


def confusion_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, on the inputs' device (no host sync).

    Ignored pixels add 0 to bin 0 instead of being masked out, so every shape is fixed: boolean indexing and CUDA's
    ``bincount`` (which reads the input's maximum back to the host) would each sync."""
    target = target.reshape(-1).long()
    preds = preds.reshape(-1).long()
    valid = target != ignore_index
    idx = torch.where(valid, target * num_classes + preds, 0)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=idx.device)
    return counts.index_add_(0, idx, valid.long()).reshape(num_classes, num_classes)


class ConfusionMatrix(Metric):
    """Accumulates one confusion matrix over a whole split; summed across processes under DDP."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("matrix", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``: class indices (N,H,W) or logits (N,C,H,W); ``target``: (N,H,W) with 255 = ignore."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(1)
        self.matrix += confusion_counts(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> torch.Tensor:
        return self.matrix


def scores_from_confusion(matrix: torch.Tensor) -> dict:
    """``miou``, ``pixel_acc``, ``mean_class_acc`` (floats) and ``per_class_iou``/``per_class_acc`` (lists,
    ``None`` where undefined) from a (C, C) confusion matrix."""
    m = matrix.detach().double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = m.sum()

    def nanmean(t: torch.Tensor) -> float:
        v = t[~t.isnan()]
        return float(v.mean()) if v.numel() else float("nan")

    return {
        "miou": nanmean(iou),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": nanmean(acc),
        "per_class_iou": [None if math.isnan(v) else float(v) for v in iou.tolist()],
        "per_class_acc": [None if math.isnan(v) else float(v) for v in acc.tolist()],
    }
