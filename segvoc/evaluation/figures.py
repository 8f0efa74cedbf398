"""Pictures: mask overlays (with a legend), image | truth | prediction grids, confusion-matrix heat maps."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure

from segvoc.data.palette import IGNORE_INDEX, VOC_CLASSES, VOC_COLORMAP, colorize


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
    fig = Figure(figsize=(size + 1.5, size))  # matplotlib's object API: no pyplot state, no backend switch
    ax = fig.subplots()
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


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The blended overlay with a legend strip (colour swatch + class name) for the classes present."""
    blended = overlay(image, mask, alpha)
    present = [int(c) for c in np.unique(mask) if c < len(VOC_CLASSES)]
    row_h = max(18, image.shape[0] // 25)
    legend = np.full((row_h * len(present) + 8, max(170, image.shape[1] // 4), 3), 255, np.uint8)
    for k, c in enumerate(present):
        y = 4 + k * row_h
        cv2.rectangle(legend, (6, y + 2), (6 + row_h - 4, y + row_h - 2), VOC_COLORMAP[c].tolist(), -1)
        cv2.putText(legend, VOC_CLASSES[c], (row_h + 8, y + row_h - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    row_h / 36, (0, 0, 0), 1, cv2.LINE_AA)
    h = max(blended.shape[0], legend.shape[0])
    canvas = np.full((h, blended.shape[1] + legend.shape[1], 3), 255, np.uint8)
    canvas[: blended.shape[0], : blended.shape[1]] = blended
    canvas[: legend.shape[0], blended.shape[1]:] = legend
    return canvas
