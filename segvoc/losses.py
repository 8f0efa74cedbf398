"""Losses (``conf/loss``): cross-entropy and inverse-frequency weighted cross-entropy."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from segvoc.data.io import load_mask
from segvoc.data.palette import IGNORE_INDEX
from segvoc.utils import atomic_write_text


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

    def nll(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The same loss for averaged probabilities (test-time augmentation)."""
        return F.nll_loss(probs.clamp_min(1e-12).log(), target.long(),
                          weight=self.weight if self.weighted else None, ignore_index=self.ignore_index)


def class_pixel_counts(mask_paths: Sequence[Path], num_classes: int = 21) -> np.ndarray:
    """Pixels per class over the given masks (255 ignored), with a progress bar."""
    counts = np.zeros(256, dtype=np.int64)
    for p in track(mask_paths, description="counting class pixels", transient=True, disable=len(mask_paths) < 50):
        counts += np.bincount(load_mask(p).reshape(-1), minlength=256)
    return counts[:num_classes]


def inverse_frequency_weights(counts: np.ndarray, background_scale: float = 1.0) -> np.ndarray:
    """w_c = N / (K * n_c) over the K classes present (a balanced set gives all ones); absent classes get 0.

    ``background_scale`` then multiplies the background (class 0) weight (the report tried x80).
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    w[0] *= background_scale
    return w


def cached_class_counts(mask_paths: Sequence[Path], cache_dir: Path, num_classes: int = 21) -> np.ndarray:
    """``class_pixel_counts`` cached in ``cache_dir`` under a key of the mask paths, sizes and mtimes."""
    h = hashlib.sha1()
    for p in mask_paths:
        st = Path(p).stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) / f"class_counts_{h.hexdigest()[:16]}.json"
    if cache.is_file():
        return np.array(json.loads(cache.read_text()), dtype=np.int64)
    counts = class_pixel_counts(mask_paths, num_classes)
    atomic_write_text(cache, json.dumps(counts.tolist()))
    return counts
