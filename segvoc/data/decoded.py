"""``data.decode_cache``: decode every training image and mask once into one memory-mapped uint8 file.

JPEG decoding is about half of a loader worker's time on VOC-sized images (``segvoc.bench``, ``loader``). With the
cache, workers read raw pixels from the page cache instead. The file lives under ``paths.cache_dir``, named by the
source files' key (``segvoc.utils.files_key``, like the class-count cache): editing or replacing any file makes a new
one. The cache checks itself before use: the index must be whole and of this format, and the data file must have the
size the index's shapes give; otherwise (a truncated copy, a half-written file) it is built again.
Costs disk (and page cache): H x W x 4 bytes per pair, about 0.75 MB for a 500 x 375 VOC image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from rich.progress import track

from segvoc.utils import atomic_write, atomic_write_text, file_lock, files_key

FORMAT = 2  # of the index; an index of another format is rebuilt


class DecodedPairs:
    """Decoded (image, mask) pairs of ``image_paths``/``mask_paths``, built once, then read by memory map."""

    def __init__(self, load: Callable[[int], tuple[np.ndarray, np.ndarray]], source_files: Sequence[Path],
                 count: int, cache_dir: Path) -> None:
        """``load(k)``: the checked, decoded pair k (``VOCPairs.load``); ``source_files``: what the key covers."""
        key = files_key(source_files)  # content key: a replaced or edited source file gives another cache
        self.data_path = Path(cache_dir) / f"decoded_{key}.u8"
        self.index_path = Path(cache_dir) / f"decoded_{key}.json"
        index = self._valid_index(count)
        if index is None:
            index = self._build(load, count)
        self.offsets: list[int] = index["offsets"]
        self.shapes: list[tuple[int, int]] = [tuple(s) for s in index["shapes"]]
        self._data: np.memmap | None = None  # opened in each process (loader workers) on first use

    def _valid_index(self, count: int) -> dict | None:
        """The index, if it and the data file are whole and of these sources; None when the cache must be built."""
        try:
            index = json.loads(self.index_path.read_text())
            size = self.data_path.stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            return None
        try:
            expected = sum(int(h) * int(w) * 4 for h, w in index["shapes"])
            whole = len(index["offsets"]) == len(index["shapes"]) == count and index["bytes"] == expected == size
        except (KeyError, TypeError, ValueError):
            return None
        return index if whole else None

    def _build(self, load: Callable[[int], tuple[np.ndarray, np.ndarray]], count: int) -> dict:
        with file_lock(self.data_path.with_suffix(".lock"), "paths.cache_dir"):  # one writer; ranks and jobs wait
            index = self._valid_index(count)  # built by another process while this one waited
            if index is not None:
                return index
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
            index = {"format": FORMAT, "bytes": sum(h * w * 4 for h, w in shapes),
                     "offsets": offsets, "shapes": shapes}
            atomic_write_text(self.index_path, json.dumps(index))
            return index

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
