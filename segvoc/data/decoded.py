"""``data.decode_cache``: decode every training image and mask once into one memory-mapped uint8 file.

JPEG decoding is about half of a loader worker's time on VOC-sized images (``segvoc.bench``, ``loader``). With the
cache, workers read raw pixels from the page cache instead. The file lives under ``paths.cache_dir``, keyed by the
source files' paths, sizes and mtimes (like the class-count cache): editing or replacing any file makes a new one.
Costs disk (and page cache): H x W x 4 bytes per pair, about 0.75 MB for a 500 x 375 VOC image.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from rich.progress import track

from segvoc.utils import atomic_write, atomic_write_text, files_key


class DecodedPairs:
    """Decoded (image, mask) pairs of ``image_paths``/``mask_paths``, built once, then read by memory map."""

    def __init__(self, load: Callable[[int], tuple[np.ndarray, np.ndarray]], source_files: Sequence[Path],
                 count: int, cache_dir: Path) -> None:
        """``load(k)``: the checked, decoded pair k (``VOCPairs.load``); ``source_files``: what the key covers."""
        key = files_key(source_files)
        self.data_path = Path(cache_dir) / f"decoded_{key}.u8"
        self.index_path = Path(cache_dir) / f"decoded_{key}.json"
        if not self.index_path.is_file():
            self._build(load, count)
        index = json.loads(self.index_path.read_text())
        self.offsets: list[int] = index["offsets"]
        self.shapes: list[tuple[int, int]] = [tuple(s) for s in index["shapes"]]
        self._data: np.memmap | None = None  # opened in each process (loader workers) on first use

    def _build(self, load: Callable[[int], tuple[np.ndarray, np.ndarray]], count: int) -> None:
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_path.with_suffix(".lock"), "w") as lock:  # one writer; DDP ranks and sweep jobs wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.index_path.is_file():
                return
            offsets, shapes = [], []

            def write(f: IO) -> None:
                pos = 0
                for k in track(range(count), description="decoding images once (data.decode_cache)",
                               disable=count < 50):
                    image, mask = load(k)
                    offsets.append(pos)
                    shapes.append(list(mask.shape))
                    f.write(np.ascontiguousarray(image).tobytes())
                    f.write(np.ascontiguousarray(mask).tobytes())
                    pos += mask.size * 4

            atomic_write(self.data_path, write, binary=True)
            atomic_write_text(self.index_path, json.dumps({"offsets": offsets, "shapes": shapes}))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (H,W,3), index mask uint8 (H,W)) of pair ``index``, copied out of the memory map."""
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        h, w = self.shapes[index]
        start = self.offsets[index]
        image = np.array(self._data[start:start + h * w * 3]).reshape(h, w, 3)
        mask = np.array(self._data[start + h * w * 3:start + h * w * 4]).reshape(h, w)
        return image, mask

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}  # workers map the file themselves
