"""A dataset's classes (names in index order, a colour each, the ignore label) and converting masks between class
indices and colours. The colours default to PASCAL VOC's palette, which any dataset may use; VOC's own class names
live with its layout (``segvoc.data.voc``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


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


@dataclass(frozen=True)
class ClassSet:
    """A dataset's classes: ``names`` in index order (N classes, labels 0..N-1), ``colors`` (one RGB each; default
    VOC's palette) and ``ignore_index`` (pixels not labelled)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None = None
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """(256, 3) uint8: the class colours at their labels, VOC's colour map everywhere else (so the ignore label
        keeps VOC's (224, 224, 192) unless a class uses it)."""
        out = VOC_COLORMAP.copy()
        if self.colors is not None:
            out[: len(self.colors)] = np.asarray(self.colors, dtype=np.uint8)
        return out

    def to_config(self) -> dict:
        """The ``data.class_names`` / ``data.colors`` / ``data.ignore_index`` values of a run's config."""
        return {"class_names": list(self.names), "colors": [list(c) for c in self.colors] if self.colors else None,
                "ignore_index": self.ignore_index}

    @classmethod
    def from_config(cls, data: Mapping) -> ClassSet:
        """The classes a run's ``data`` node states (``class_names``, ``colors``, ``ignore_index``)."""
        colors, ignore = data.get("colors"), data.get("ignore_index")
        return cls(tuple(str(n) for n in data["class_names"]),
                   tuple(tuple(int(v) for v in c) for c in colors) if colors else None,
                   int(ignore) if ignore is not None else IGNORE_INDEX)


def palette_bytes(palette: np.ndarray = VOC_COLORMAP) -> list[int]:
    """A (256, 3) palette flattened for ``PIL.Image.putpalette``."""
    return np.asarray(palette, dtype=np.uint8).reshape(-1).tolist()


def colorize(mask: np.ndarray, palette: np.ndarray = VOC_COLORMAP) -> np.ndarray:
    """Class-index mask (H, W) -> RGB image (H, W, 3) in the palette's colours."""
    return np.asarray(palette, dtype=np.uint8)[mask.astype(np.uint8)]


def rgb_to_index(rgb: np.ndarray, colors: Sequence[Sequence[int]] | np.ndarray | None = None,
                 ignore_index: int = IGNORE_INDEX) -> np.ndarray | None:
    """Map a colour mask (H, W, 3) back to class indices through ``colors`` (one RGB per class; default: VOC's 21),
    the ignore label's colour being the palette's; None if any colour is not one of them."""
    colors = np.asarray(colors if colors is not None else VOC_COLORMAP[:21], dtype=np.uint8)
    known = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i for i, c in enumerate(colors)}
    ignore = VOC_COLORMAP[ignore_index]
    known.setdefault(int(ignore[0]) << 16 | int(ignore[1]) << 8 | int(ignore[2]), ignore_index)
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    uniq, inverse = np.unique(codes, return_inverse=True)
    if any(int(u) not in known for u in uniq):
        return None
    return np.array([known[int(u)] for u in uniq], dtype=np.uint8)[inverse].reshape(codes.shape)
