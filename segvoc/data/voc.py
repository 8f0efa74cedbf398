"""The PASCAL VOC 2012 folder layout: locating it, reading split lists, and the Dataset of image/mask pairs."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from segvoc.data.pairs import SegmentationPairs
from segvoc.data.palette import VOC_COLORMAP, ClassSet
from segvoc.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_CLASS_SET = ClassSet(VOC_CLASSES, tuple(tuple(int(v) for v in c) for c in VOC_COLORMAP[:21]))
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


def VOCPairs(voc: Path, ids: Sequence[str], mask_dir: str = "SegmentationClass",  # noqa: N802
             transform: Callable[..., dict] | None = None, seed: int = 0,
             classes: ClassSet = VOC_CLASS_SET) -> SegmentationPairs:
    """The pairs of ``ids`` in a VOC tree (``JPEGImages/<id>.jpg``, ``<mask_dir>/<id>.png``)."""
    voc = Path(voc)
    return SegmentationPairs(ids, [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
                             [voc / mask_dir / f"{i}.png" for i in ids], classes, transform, seed)


class VOCLayout:
    """PASCAL VOC 2012's layout as a dataset description: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
    ImageSets/Segmentation}`` under ``root``, VOC's 21 class names and palette, ``test`` a seeded
    ``test_fraction`` of the official val list (``make_splits``)."""

    name = "voc"

    def __init__(self, root: str | Path, train_split: str = "train", test_fraction: float = 0.5,
                 split_seed: int = 0, classes: ClassSet = VOC_CLASS_SET) -> None:
        self.root = Path(root).expanduser()
        self.voc = resolve_voc_root(self.root)
        self.train_split, self.test_fraction, self.split_seed = train_split, test_fraction, split_seed
        self.classes = classes

    def splits(self, subset: int | None = None, check_files: bool = True) -> dict[str, list[str]]:
        return make_splits(self.voc, self.train_split, self.test_fraction, self.split_seed, subset, check_files)

    def pairing_problems(self, splits: dict[str, list[str]]) -> list[str]:
        """Every listed id without its image or mask, one line each."""
        problems = []
        for name, ids in splits.items():
            listed_in = split_file(self.voc, name, self.train_split)
            problems += [f"{listed_in}: id {i} has no {' and no '.join(lacks)} (under {self.voc}); restore it or "
                         "remove the id from the list"
                         for i, lacks in missing_files(self.voc, ids, mask_dir_for(self.voc, name,
                                                                                   self.train_split)).items()]
        return problems

    def list_file(self, split: str) -> Path | None:
        return split_file(self.voc, split, self.train_split)

    def image_path(self, split: str, i: str) -> Path:
        return self.voc / "JPEGImages" / f"{i}.jpg"

    def mask_path(self, split: str, i: str) -> Path:
        return self.voc / mask_dir_for(self.voc, split, self.train_split) / f"{i}.png"
