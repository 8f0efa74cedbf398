"""PASCAL VOC class names and colour palette; converting masks between indices and colours."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)  # conf/data's num_classes must equal this for VOC


def voc_colormap(n: int = 256) -> np.ndarray:
    """The official VOC colour map (bit-interleaved), shape (n, 3) uint8; index 255 is (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_COLORMAP = voc_colormap()


def palette_bytes() -> list[int]:
    """The VOC palette flattened for ``PIL.Image.putpalette``."""
    return VOC_COLORMAP.reshape(-1).tolist()


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask (H, W) -> RGB image (H, W, 3) in VOC colours."""
    return VOC_COLORMAP[mask.astype(np.uint8)]


def rgb_to_index(rgb: np.ndarray) -> np.ndarray | None:
    """Map an RGB VOC-coloured mask back to class indices; None if any colour is not a VOC colour."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = list(range(NUM_CLASSES)) + [IGNORE_INDEX]
    lut = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i for i, c in zip(known, VOC_COLORMAP[known], strict=True)}
    uniq, inverse = np.unique(codes, return_inverse=True)
    if any(int(u) not in lut for u in uniq):
        return None
    return np.array([lut[int(u)] for u in uniq], dtype=np.uint8)[inverse].reshape(codes.shape)
