"""Dataset statistics: per-class pixel counts over a split's masks (255 ignored), cached on disk."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from segvoc.data.io import load_mask
from segvoc.data.palette import ClassSet
from segvoc.utils import atomic_write_text, files_key


@dataclass
class ClassStatistics:
    """``counts[c]``: pixels labelled c. ``image_pixels[c]``: labelled (non-255) pixels of the images in which c
    appears (the denominator of SegNet's median-frequency balancing)."""

    counts: np.ndarray
    image_pixels: np.ndarray


def class_statistics(mask_paths: Sequence[Path], classes: ClassSet) -> ClassStatistics:
    """Count every mask once (with a progress bar on long lists)."""
    num_classes = classes.num_classes
    counts = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for p in track(mask_paths, description="counting class pixels", transient=True, disable=len(mask_paths) < 50):
        mask = load_mask(p, num_classes, classes.ignore_index, classes.colors)
        per_image = np.bincount(mask.reshape(-1), minlength=256)[:num_classes]
        counts += per_image
        image_pixels[per_image > 0] += per_image.sum()
    return ClassStatistics(counts, image_pixels)


def cached_class_statistics(mask_paths: Sequence[Path], cache_dir: Path, classes: ClassSet) -> ClassStatistics:
    """``class_statistics`` cached in ``cache_dir`` under a key of the mask files and the classes."""
    cache = Path(cache_dir) / f"class_stats_{classes.num_classes}_{files_key(mask_paths)}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return ClassStatistics(np.array(data["counts"], np.int64), np.array(data["image_pixels"], np.int64))
    stats = class_statistics(mask_paths, classes)
    atomic_write_text(cache, json.dumps({"counts": stats.counts.tolist(), "image_pixels": stats.image_pixels.tolist()}))
    return stats
