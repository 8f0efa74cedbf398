"""The one reader of image/mask pairs, whatever the dataset's layout (``segvoc.data.layouts``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segvoc.data.io import load_image, load_mask
from segvoc.data.palette import ClassSet
from segvoc.data.sampling import mix_seed
from segvoc.data.transforms import seed_pipeline
from segvoc.errors import DatasetError


class SegmentationPairs(Dataset):
    """Image/mask pairs of one split: ``ids`` with their ``image_paths`` and ``mask_paths``; masks are read as class
    indices of ``classes`` (colour masks through its colours). Items: ``{"image": uint8 (3,H,W), "mask": uint8 (H,W),
    "id": str}``."""

    def __init__(self, ids: Sequence[str], image_paths: Sequence[Path], mask_paths: Sequence[Path],
                 classes: ClassSet, transform: Callable[..., dict] | None = None, seed: int = 0) -> None:
        self.ids = list(ids)
        self.image_paths = [Path(p) for p in image_paths]
        self._mask_paths = [Path(p) for p in mask_paths]
        self.classes = classes
        self.transform = transform
        self.seed = seed
        self._sizes: list[tuple[int, int]] | None = None
        self.decoded: Any = None  # DecodedPairs when data.decode_cache is on
        self.device_augment: Any = None  # DeviceAugment when data.device_augment is on: plans, no transform

    def __len__(self) -> int:
        return len(self.ids)

    def mask_paths(self) -> list[Path]:
        """The mask file of every id, in order."""
        return list(self._mask_paths)

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every pair, in order, read from the mask files' headers (no decoding; cached)."""
        if self._sizes is None:
            sizes = []
            for path in self._mask_paths:
                try:
                    with Image.open(path) as im:
                        sizes.append((im.height, im.width))
                except OSError:
                    raise DatasetError(f"{path}: cannot read this mask; restore it or remove its id from the "
                                       "split list") from None
            self._sizes = sizes
        return self._sizes

    def use_decode_cache(self, cache_dir: Path) -> None:
        """Read pairs from a one-time decoded, memory-mapped copy (``data.decode_cache``; ``segvoc.data.decoded``)."""
        from segvoc.data.decoded import DecodedPairs

        self.decoded = None  # the cache is built through self.load, which must decode the files themselves
        self.decoded = DecodedPairs(self.load, self.image_paths + self._mask_paths, len(self), cache_dir)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw RGB image and index mask of one id, after checking they match in size."""
        if self.decoded is not None:
            return self.decoded[index]
        image = load_image(self.image_paths[index])
        mask_path = self._mask_paths[index]
        mask = load_mask(mask_path, self.classes.num_classes, self.classes.ignore_index, self.classes.colors)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; the pair must have the same size"
            )
        return image, mask

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Item ``index``; ``(epoch, index)`` also seeds the augmentation from (seed, epoch, index)."""
        epoch = 0
        if isinstance(index, tuple):
            epoch, index = index
        image, mask = self.load(index)
        item: dict[str, Any] = {}
        if self.device_augment is not None:  # parameters only: the device runs them (data.device_augment)
            item["augment"] = self.device_augment.draw(mix_seed(self.seed, epoch, index) % (2**32), *mask.shape)
        elif self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                seed_pipeline(self.transform, mix_seed(self.seed, epoch, index) % (2**32))
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "id": self.ids[index],
            **item,
        }
