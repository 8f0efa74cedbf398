"""Dataset statistics: per-class pixel counts over a split's masks (255 ignored), cached on disk."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from segvoc.data.io import load_mask
from segvoc.utils import atomic_write_text, files_key


@dataclass
class ClassStatistics:
    """``counts[c]``: pixels labelled c. ``image_pixels[c]``: labelled (non-255) pixels of the images in which c
    appears (the denominator of SegNet's median-frequency balancing)."""

    counts: np.ndarray
    image_pixels: np.ndarray


def class_statistics(mask_paths: Sequence[Path], num_classes: int) -> ClassStatistics:
    """Count every mask once (with a progress bar on long lists)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for p in track(mask_paths, description="counting class pixels", transient=True, disable=len(mask_paths) < 50):
        per_image = np.bincount(load_mask(p).reshape(-1), minlength=256)[:num_classes]
        counts += per_image
        image_pixels[per_image > 0] += per_image.sum()
    return ClassStatistics(counts, image_pixels)


def cached_class_statistics(mask_paths: Sequence[Path], cache_dir: Path, num_classes: int) -> ClassStatistics:
    """``class_statistics`` cached in ``cache_dir`` under a key of the mask paths, sizes and mtimes."""
    cache = Path(cache_dir) / f"class_stats_{num_classes}_{files_key(mask_paths)}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return ClassStatistics(np.array(data["counts"], np.int64), np.array(data["image_pixels"], np.int64))
    stats = class_statistics(mask_paths, num_classes)
    atomic_write_text(cache, json.dumps({"counts": stats.counts.tolist(), "image_pixels": stats.image_pixels.tolist()}))
    return stats
