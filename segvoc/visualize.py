"""Pictures: mask overlays, image | truth | prediction grids, and confusion-matrix heat maps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from segvoc.data.palette import IGNORE_INDEX, VOC_CLASSES, colorize  # noqa: E402


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB uint8 image with the VOC colours of ``mask``; background and 255 stay as the image."""
    colors = colorize(mask).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colors * alpha
    keep = (mask == 0) | (mask == IGNORE_INDEX)
    blend[keep] = image[keep]
    return blend.clip(0, 255).astype(np.uint8)


def prediction_row(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """One row: image | ground truth (colours) | prediction (colours) | prediction overlay."""
    return np.concatenate([image, colorize(truth), colorize(pred), overlay(image, pred)], axis=1)


def prediction_grid(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], width: int = 256) -> np.ndarray:
    """Stack ``prediction_row``s, each resized (nearest) to ``width`` per panel, into one RGB image."""
    import cv2

    out = []
    for image, truth, pred in rows:
        h, w = truth.shape
        size = (width, max(1, round(h * width / w)))
        out.append(prediction_row(cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                                  cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST),
                                  cv2.resize(pred, size, interpolation=cv2.INTER_NEAREST)))
    return np.concatenate(out, axis=0)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str] = VOC_CLASSES, title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows = truth) as a heat map; classes with no pixels are dropped."""
    m = np.asarray(matrix, dtype=np.float64)
    keep = (m.sum(0) + m.sum(1)) > 0
    m = m[keep][:, keep]
    names = [n for n, k in zip(class_names, keep, strict=True) if k]
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = 2 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if len(names) <= 22:
        for i in range(len(names)):
            for j in range(len(names)):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig

