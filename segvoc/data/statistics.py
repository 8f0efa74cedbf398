"""Dataset statistics: class pixel counts over a split's masks, cached on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.progress import track

from segvoc.data.io import load_mask
from segvoc.utils import atomic_write_text


def class_pixel_counts(mask_paths: Sequence[Path], num_classes: int) -> np.ndarray:
    """Pixels per class over the given masks (255 ignored), with a progress bar."""
    counts = np.zeros(256, dtype=np.int64)
    for p in track(mask_paths, description="counting class pixels", transient=True, disable=len(mask_paths) < 50):
        counts += np.bincount(load_mask(p).reshape(-1), minlength=256)
    return counts[:num_classes]


def cached_class_counts(mask_paths: Sequence[Path], cache_dir: Path, num_classes: int) -> np.ndarray:
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
