"""The PASCAL VOC 2012 folder layout: locating it, reading split lists, and the Dataset of image/mask pairs."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segvoc.data.io import load_image, load_mask
from segvoc.data.palette import NUM_CLASSES
from segvoc.data.sampling import mix_seed
from segvoc.data.transforms import seed_pipeline
from segvoc.errors import DatasetError

REQUIRED_DIRS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
AUG_MASK_DIR = "SegmentationClassAug"


def resolve_voc_root(root: str | Path) -> Path:
    """Find ``VOC2012/`` given it, its ``VOCdevkit/`` parent, or the folder holding ``VOCdevkit/``."""
    root = Path(root).expanduser()
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            check_layout(cand)
            return cand
    if root.exists():
        check_layout(root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit").exists() else root)
    raise DatasetError(
        f"VOC 2012 not found at {root} (expected {root}/VOCdevkit/VOC2012/JPEGImages); "
        "set data.root=<folder holding VOCdevkit>, or get it with python -m segvoc.data.prepare data.root=<dir> "
        "(or data.download=true) when online"
    )


def check_layout(voc: Path) -> None:
    """Raise a ``DatasetError`` naming the first sub-folder of the official layout that is missing."""
    if not voc.is_dir():
        raise DatasetError(f"{voc}: folder does not exist; set data.root to the folder holding VOCdevkit")
    missing = [d for d in REQUIRED_DIRS if not (voc / d).is_dir()]
    if missing:
        raise DatasetError(
            f"{voc}: missing {', '.join(missing)} (half-extracted?); re-extract VOCtrainval_11-May-2012.tar "
            "or run python -m segvoc.data.prepare"
        )


def read_id_list(path: Path) -> list[str]:
    """Read a split file (one id per line); empty or missing files are a ``DatasetError``."""
    if not path.is_file():
        raise DatasetError(f"{path}: split list is missing; restore it or choose another data.train_split")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split list is empty; restore it from the VOC devkit")
    return ids


def missing_files(voc: Path, ids: Sequence[str], mask_dir: str) -> dict[str, list[str]]:
    """The files (relative to ``voc``) each id lacks, for the ids that lack any (existence only: cheap)."""
    missing = {}
    for i in ids:
        lacks = [f for f in (f"JPEGImages/{i}.jpg", f"{mask_dir}/{i}.png") if not (voc / f).is_file()]
        if lacks:
            missing[i] = lacks
    return missing


def check_ids(voc: Path, ids: Sequence[str], mask_dir: str, split_file: Path) -> None:
    """Check (cheaply: existence only) that every id has an image and a mask."""
    missing = missing_files(voc, ids, mask_dir)
    if missing:
        shown = ", ".join(f"{i} (no {' or '.join(lacks)})" for i, lacks in list(missing.items())[:3])
        raise DatasetError(
            f"{split_file}: {len(missing)} of {len(ids)} ids have no image or mask under {voc} "
            f"(first: {shown}); re-extract the dataset or remove them from the list"
        )


def split_file(voc: Path, split: str, train_split: str) -> Path:
    """The split list ``split``'s ids come from: ``<train_split>.txt`` for train, ``val.txt`` for val and test."""
    return voc / "ImageSets" / "Segmentation" / (f"{train_split}.txt" if split == "train" else "val.txt")


def make_splits(
    voc: Path,
    train_split: str = "train",
    test_fraction: float = 0.5,
    split_seed: int = 0,
    subset: int | None = None,
    check_files: bool = True,
) -> dict[str, list[str]]:
    """Return ids for train/val/test.

    VOC's test masks are not public, so ``test`` is a seeded ``test_fraction`` of the official val list
    and ``val`` the rest. ``subset`` keeps the first N ids of each split. ``check_files=False`` leaves ids whose
    image or mask is missing for the caller to report (``segvoc.data.tree_check``).
    """
    sets = voc / "ImageSets" / "Segmentation"
    train_ids = read_id_list(sets / f"{train_split}.txt")
    official_val = read_id_list(sets / "val.txt")
    shuffled = sorted(official_val)
    random.Random(split_seed).shuffle(shuffled)
    n_test = int(round(len(shuffled) * test_fraction))
    splits = {"train": train_ids, "val": sorted(shuffled[n_test:]), "test": sorted(shuffled[:n_test])}
    if train_split != "train":
        overlap = set(train_ids) & set(official_val)
        if overlap:
            raise DatasetError(f"{sets}/{train_split}.txt shares {len(overlap)} ids with val.txt; remove them")
    if subset:
        splits = {k: v[:subset] for k, v in splits.items()}
    for name, ids in splits.items():
        if not ids and not (name == "test" and test_fraction == 0):
            raise DatasetError(f"{sets}: split {name!r} is empty; check data.test_fraction and data.subset")
        if check_files:
            check_ids(voc, ids, mask_dir_for(voc, name, train_split), split_file(voc, name, train_split))
    return splits


def mask_dir_for(voc: Path, split: str, train_split: str) -> str:
    """The mask folder of ``split``: ``SegmentationClassAug`` for the train split of SBD's ``train_aug``,
    ``SegmentationClass`` for everything else (the one place this rule is written)."""
    if split == "train" and train_split == "train_aug":
        if not (voc / AUG_MASK_DIR).is_dir():
            raise DatasetError(
                f"{voc}/{AUG_MASK_DIR} is missing; data.train_split=train_aug needs the SBD masks there "
                "(or use data.train_split=train)"
            )
        return AUG_MASK_DIR
    return "SegmentationClass"


class VOCPairs(Dataset):
    """Image/mask pairs of one split. Items: ``{"image": uint8 (3,H,W), "mask": uint8 (H,W), "id": str}``."""

    def __init__(
        self,
        voc: Path,
        ids: Sequence[str],
        mask_dir: str = "SegmentationClass",
        transform: Callable[..., dict] | None = None,
        seed: int = 0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        self.voc = Path(voc)
        self.num_classes = num_classes
        self.ids = list(ids)
        self.mask_dir = mask_dir
        self.transform = transform
        self.seed = seed
        self._sizes: list[tuple[int, int]] | None = None
        self.decoded: Any = None  # DecodedPairs when data.decode_cache is on
        self.device_augment: Any = None  # DeviceAugment when data.device_augment is on: plans, no transform

    def __len__(self) -> int:
        return len(self.ids)

    def mask_paths(self) -> list[Path]:
        """The mask file of every id, in order."""
        return [self.voc / self.mask_dir / f"{i}.png" for i in self.ids]

    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every pair, in order, read from the mask files' headers (no decoding; cached)."""
        if self._sizes is None:
            sizes = []
            for path in self.mask_paths():
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
        files = [self.voc / "JPEGImages" / f"{i}.jpg" for i in self.ids] + self.mask_paths()
        self.decoded = DecodedPairs(self.load, files, len(self), cache_dir)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw RGB image and index mask of one id, after checking they match in size."""
        if self.decoded is not None:
            return self.decoded[index]
        i = self.ids[index]
        image = load_image(self.voc / "JPEGImages" / f"{i}.jpg")
        mask_path = self.voc / self.mask_dir / f"{i}.png"
        mask = load_mask(mask_path, self.num_classes)
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
