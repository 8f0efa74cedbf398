"""Top-label expected calibration error over pixels (Guo et al., ICML 2017), kept on the device.

Confidence is the highest class probability of the output that makes the prediction (after TTA); pixels
labelled 255 are left out. Bins are equal-width: bin b holds confidences in (b/K, (b+1)/K] (0 joins the first).
ECE = sum_b n_b / N * |accuracy_b - confidence_b|, from per-bin pixel counts, confidence sums and correct sums.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from segvoc.data.palette import IGNORE_INDEX

ECE_BINS = 15


def calibration_bins(log_probs: torch.Tensor, target: torch.Tensor, bins: int = ECE_BINS,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(N, 3, bins) float64 per image: pixel count, confidence sum and correct-pixel count per confidence bin,
    for log-probabilities (N, C, H, W) and ``target`` (N, H, W); no host sync."""
    n = log_probs.shape[0]
    top, pred = log_probs.max(1)
    conf = top.double().exp().reshape(n, -1)
    valid = (target != ignore_index).reshape(n, -1)
    correct = (pred == target).reshape(n, -1) & valid
    b = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    image = torch.arange(n, device=conf.device).view(-1, 1)
    idx = torch.where(valid, image * bins + b, torch.full_like(b, n * bins)).reshape(-1)  # ignored: a spare slot
    size = n * bins + 1

    def count(weights: torch.Tensor | None) -> torch.Tensor:
        return torch.bincount(idx, weights=weights, minlength=size)[:-1].reshape(n, bins).double()

    return torch.stack([count(None), count(conf.reshape(-1)), count(correct.reshape(-1).double())], 1)


class Calibration(Metric):
    """Per-bin pixel counts, confidence sums and correct sums over a split (summed across processes)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, bins: int = ECE_BINS, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins, self.ignore_index = bins, ignore_index
        self.add_state("table", default=torch.zeros(3, bins, dtype=torch.float64), dist_reduce_fx="sum")

    def per_image(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``calibration_bins`` (N, 3, bins) of a batch, with this metric's settings."""
        return calibration_bins(log_probs, target, self.bins, self.ignore_index)

    def update(self, per_image: torch.Tensor) -> None:
        """Adds the per-image bins (N, 3, bins) of a batch (``per_image``)."""
        self.table += per_image.sum(0)

    def compute(self) -> torch.Tensor:
        return self.table


def calibration_scores(table: torch.Tensor) -> dict:
    """``ece`` and the bin table ``calibration`` (``{"count", "confidence", "accuracy"}`` per bin, None where a
    bin is empty) from a (3, bins) table."""
    t = table.detach().double().cpu()
    n, conf, correct = t[0], t[1], t[2]
    total = float(n.sum())
    ece = float((correct - conf).abs().sum() / total) if total > 0 else float("nan")
    return {"ece": ece, "calibration": {
        "count": [int(v) for v in n.tolist()],
        "confidence": [float(c / k) if k > 0 else None for c, k in zip(conf.tolist(), n.tolist(), strict=True)],
        "accuracy": [float(c / k) if k > 0 else None for c, k in zip(correct.tolist(), n.tolist(), strict=True)]}}
