"""Losses (``conf/loss``): every one takes logits (N,C,H,W) or ``{"out", "aux"}``, integer targets (N,H,W) with
255 ignored, and optional class weights; each reduces in float32, also under bf16 autocast.

Softmax-based throughout, so any of them may be given log-probabilities instead of logits (as evaluation does after
test-time augmentation) and gives the same value. Lovász-softmax comes from segmentation_models_pytorch (the smp
extra, imported when the loss is built).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segvoc.data.palette import IGNORE_INDEX
from segvoc.extras import require


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                  deterministic: bool | None = None) -> torch.Tensor:
    """``F.cross_entropy``'s (weighted) mean over non-ignored pixels.

    ``deterministic`` (default: on CUDA while ``torch.use_deterministic_algorithms`` is on, as
    ``trainer.deterministic=true`` sets it): per-pixel losses summed by an ordinary reduction, because the mean
    inside ``F.cross_entropy`` (``nll_loss2d``) uses atomicAdd on CUDA and raises in deterministic mode."""
    if deterministic is None:
        deterministic = logits.is_cuda and torch.are_deterministic_algorithms_enabled()
    if not deterministic:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if weight is None:
        return per_pixel.sum() / valid.sum()
    return per_pixel.sum() / (weight[torch.where(valid, target, 0)] * valid).sum()


class SegmentationLoss(nn.Module):
    """Shared frame: class weights as a buffer (they travel in checkpoints), the auxiliary-head term, float32.

    ``weight=None`` with ``weighted=True``: the weights arrive later with a checkpoint's state dict.
    """

    def __init__(self, num_classes: int = 21, weight: torch.Tensor | Sequence[float] | None = None,
                 ignore_index: int = IGNORE_INDEX, weighted: bool | None = None, aux_weight: float = 0.5) -> None:
        super().__init__()
        w = torch.ones(num_classes) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", w.float())
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.weighted = weight is not None if weighted is None else weighted
        self.aux_weight = aux_weight

    @property
    def class_weight(self) -> torch.Tensor | None:
        return self.weight if self.weighted else None

    def forward(self, logits: torch.Tensor | Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits``; for ``{"out", "aux"}`` outputs adds ``aux_weight`` x the loss of ``aux``."""
        if isinstance(logits, Mapping):
            loss = self(logits["out"], target)
            if "aux" in logits and self.aux_weight:
                loss = loss + self.aux_weight * self(logits["aux"], target)
            return loss
        with torch.autocast(logits.device.type, enabled=False):
            return self.pixel_loss(logits.float(), target.long())

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(SegmentationLoss):
    """Pixel-wise cross-entropy (weighted mean over non-ignored pixels when class weights are given)."""

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.class_weight, self.ignore_index)


class Focal(SegmentationLoss):
    """Softmax focal loss (Lin et al., ICCV 2017): mean over non-ignored pixels of -w_t (1 - p_t)^gamma log p_t,
    normalised by the summed class weights w_t like weighted cross-entropy (gamma=0 is exactly cross-entropy).

    smp's FocalLoss is the one-vs-rest sigmoid form, which is not invariant to log-softmax inputs; hence this one.
    """

    def __init__(self, *args, gamma: float = 2.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        t = torch.where(valid, target, 0)
        logp_t = logits.log_softmax(1).gather(1, t.unsqueeze(1)).squeeze(1)
        focal = torch.where(valid, -(1 - logp_t.exp()).pow(self.gamma) * logp_t, 0.0)
        # masked weights, not boolean indexing: fixed shapes, no host sync on a GPU
        w = self.class_weight[t] if self.class_weight is not None else torch.ones_like(focal)
        w = torch.where(valid, w, 0.0)
        return (w * focal).sum() / w.sum().clamp_min(1e-12)


class Dice(SegmentationLoss):
    """Soft multi-class Dice, 1 - mean over the classes present in the batch's (non-ignored) targets (class weights
    weight that mean). Computed as ``smp.losses.DiceLoss("multiclass", classes=<present>)`` does, but with the
    present classes as a mask on the device: no ``unique``/``tolist`` host sync and no loss object per step."""

    def __init__(self, *args, smooth: float = 0.0, eps: float = 1e-7, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.smooth = smooth
        self.eps = eps

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, c = logits.shape[:2]
        valid = (target != self.ignore_index).reshape(n, 1, -1)
        prob = logits.log_softmax(1).exp().reshape(n, c, -1) * valid
        onehot = F.one_hot(torch.where(valid, target.reshape(n, 1, -1), 0).squeeze(1), c).permute(0, 2, 1) * valid
        onehot = onehot.to(prob.dtype)
        intersection = (prob * onehot).sum((0, 2))
        cardinality = prob.sum((0, 2)) + onehot.sum((0, 2))
        dice = (intersection + self.smooth) / (cardinality / 2 + self.smooth).clamp_min(self.eps)
        present = (onehot.sum((0, 2)) > 0).to(prob.dtype)
        w = present * self.class_weight if self.class_weight is not None else present
        # no class present (all pixels ignored): 0 with a zero gradient, as before
        return ((1 - dice) * w).sum() / w.sum().clamp_min(1e-12)


class Lovasz(SegmentationLoss):
    """Lovász-softmax (Berman et al., CVPR 2018) over the classes present, per batch
    (``smp.losses.LovaszLoss``). It has no notion of class weights; a weighting scheme is refused."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.weighted:
            from segvoc.errors import ConfigError

            raise ConfigError("loss=lovasz has no class weights; use loss.class_weights=none")
        smp = require("smp", "loss=lovasz")
        self.lovasz = smp.losses.LovaszLoss("multiclass", ignore_index=self.ignore_index)

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lovasz(logits, target)


class OHEMCrossEntropy(SegmentationLoss):
    """Cross-entropy over hard pixels only, as mmsegmentation's ``OHEMPixelSampler``: pixels whose true-class
    probability is below ``thresh``, and at least the ``min_kept`` x batch-size hardest (the threshold rises to the
    probability of the ``min_kept``-th hardest pixel when fewer are below ``thresh``)."""

    def __init__(self, *args, thresh: float = 0.7, min_kept: int = 100000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.thresh = thresh
        self.min_kept = min_kept

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        t = torch.where(valid, target, 0)
        with torch.no_grad():  # fixed shapes throughout: the k-th hardest pixel is found on the device
            prob = logits.softmax(1).gather(1, t.unsqueeze(1)).squeeze(1)
            ranked = torch.where(valid, prob, float("inf")).flatten().sort().values  # ignored pixels sort last
            kept = (valid.sum() - 1).clamp(min=0, max=self.min_kept * logits.shape[0])
            threshold = ranked.gather(0, kept.reshape(1)).squeeze(0).clamp_min(self.thresh)
            hard = valid & (prob < threshold)
        return cross_entropy(logits, torch.where(hard, target, self.ignore_index), self.class_weight,
                             self.ignore_index)


class WeightedSum(SegmentationLoss):
    """A weighted sum of other losses: ``terms={"ce": 1.0, "dice": 1.0}`` (names as in ``LOSSES``)."""

    def __init__(self, *args, terms: Mapping[str, float] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        terms = dict(terms or {"ce": 1.0, "dice": 1.0})
        unknown = sorted(set(terms) - set(LOSSES))
        if unknown:
            from segvoc.errors import ConfigError

            raise ConfigError(f"loss.terms: unknown loss {unknown[0]!r}; use {', '.join(sorted(LOSSES))}")
        self.coefficients = {name: float(c) for name, c in terms.items()}
        self.terms = nn.ModuleDict({name: LOSSES[name](*args, **kwargs) for name in terms})

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(c * self.terms[name].pixel_loss(logits, target) for name, c in self.coefficients.items())


LOSSES: dict[str, type[SegmentationLoss]] = {"ce": CrossEntropy, "focal": Focal, "dice": Dice, "lovasz": Lovasz,
                                             "ohem": OHEMCrossEntropy}
