"""Class weights for the loss (``loss.class_weights``), from the training split's class statistics.

With n_c the pixels of class c, N their total and K the number of classes present (n_c > 0); classes with no
training pixel get weight 0, and ``loss.background_scale`` then multiplies the background (class 0) weight:

- ``none``: no weighting (all ones when ``background_scale`` is not 1);
- ``inverse_frequency``: w_c = N / (K n_c) (a balanced set gives all ones);
- ``median_frequency`` (SegNet, Badrinarayanan et al. 2017): f_c = n_c / (pixels of the images where c appears),
  w_c = median(f) / f_c over the present classes;
- ``enet`` (ENet, Paszke et al. 2016): w_c = 1 / ln(1.02 + n_c / N);
- ``sqrt_inverse``: w_c = sqrt(N / (K n_c)).
"""

from __future__ import annotations

import numpy as np

from segvoc.data.statistics import ClassStatistics
from segvoc.errors import ConfigError

SCHEMES = ("none", "inverse_frequency", "median_frequency", "enet", "sqrt_inverse")


def class_weights(scheme: str, stats: ClassStatistics, background_scale: float = 1.0) -> np.ndarray | None:
    """The weights of ``scheme`` (see the module docstring); None when the loss is not to be weighted at all."""
    if scheme not in SCHEMES:
        raise ConfigError(f"loss.class_weights={scheme!r}: use one of {', '.join(SCHEMES)}")
    n = np.asarray(stats.counts, dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if scheme == "none":
        if background_scale == 1.0:
            return None
        w[:] = 1.0
    elif scheme == "inverse_frequency":
        w[present] = n.sum() / (present.sum() * n[present])
    elif scheme == "sqrt_inverse":
        w[present] = np.sqrt(n.sum() / (present.sum() * n[present]))
    elif scheme == "enet":
        w[present] = 1.0 / np.log(1.02 + n[present] / n.sum())
    elif scheme == "median_frequency":
        f = n[present] / np.asarray(stats.image_pixels, dtype=np.float64)[present]
        w[present] = np.median(f) / f
    w[0] *= background_scale
    return w
