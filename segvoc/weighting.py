"""Class weights for the loss (``loss.class_weights``), computed from the training split's class pixel counts."""

from __future__ import annotations

import numpy as np


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
