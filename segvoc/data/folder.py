"""Your own data (``data=folder``): a folder of images and masks with its own classes.

```
DIR/
  images/<id>.jpg | .jpeg | .png
  masks/<id>.png      one channel (mode L or P): each pixel's value is its class index 0..N-1;
                      255 (or classes.yaml's ignore_index) = not labelled
  classes.yaml        names: [background, water, ...]     # index order; N = len(names)
                      colors: [[r, g, b], ...]            # optional; default: VOC's palette
                      ignore_index: 255                   # optional
  splits/train.txt, val.txt, test.txt                     # optional: ids, one a line
```

Without ``splits/``, the ids are split at random (``data.split_seed``): ``data.test_fraction`` of them for test,
``data.val_fraction`` for val, the rest for training.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from segvoc.data.palette import IGNORE_INDEX, ClassSet
from segvoc.errors import DatasetError

CLASSES_FILE = "classes.yaml"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")


def read_classes(root: str | Path) -> ClassSet:
    """The classes of ``root/classes.yaml``; a missing file or a bad entry is one ``DatasetError`` line."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; a folder dataset names its classes there, in index order: "
                           "names: [background, ...] (colors: [[r, g, b], ...] and ignore_index: 255 optional)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{path}: names must be a list of at least 2 class names, in index order "
                           "(names: [background, water, ...])")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: names repeats a class name; each class needs its own")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not len(names) <= ignore <= 255:
        raise DatasetError(f"{path}: ignore_index={ignore!r} must be a whole number from {len(names)} to 255 (a label "
                           "no class has)")
    colors = data.get("colors")
    if colors is not None:
        ok = (isinstance(colors, list) and len(colors) == len(names)
              and all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and 0 <= v <= 255 for v in c) for c in colors))
        if not ok:
            raise DatasetError(f"{path}: colors must list one [r, g, b] (0-255) per class, {len(names)} in all")
        if len({tuple(c) for c in colors}) != len(colors):
            raise DatasetError(f"{path}: two classes share a colour; colour masks could not be read back")
    return ClassSet(tuple(names), tuple(tuple(c) for c in colors) if colors else None, ignore)


def read_ids(path: Path) -> list[str]:
    """The ids of a split file (one a line); an empty file is a ``DatasetError``."""
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split list is empty; list one id a line, or delete it to split at random")
    return ids


class FolderLayout:
    """Where a folder dataset's files are, which ids each split holds, and its classes."""

    name = "folder"

    def __init__(self, root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 0, classes: ClassSet | None = None) -> None:
        self.root = Path(root).expanduser()
        for folder in (self.root, self.root / "images", self.root / "masks"):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: folder does not exist; data=folder reads data.root/images/<id>.jpg "
                                   "and data.root/masks/<id>.png (set data.root to the folder holding both)")
        self.classes = classes or read_classes(self.root)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.images: dict[str, list[Path]] = {}
        for p in sorted((self.root / "images").iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                self.images.setdefault(p.stem, []).append(p)
        self.masks = {p.stem: p for p in sorted((self.root / "masks").glob("*.png")) if p.is_file()}

    def pairing_problems(self, splits: dict[str, list[str]] | None = None) -> list[str]:
        """Every image without a mask, mask without an image, id with two image files, and id of a split list
        without its pair, one line each."""
        problems = [f"{self.root / 'images' / files[0].name}: no mask {self.root / 'masks' / (i + '.png')}"
                    for i, files in self.images.items() if i not in self.masks]
        problems += [f"{path}: no image images/{i}.jpg|.jpeg|.png" for i, path in self.masks.items()
                     if i not in self.images]
        problems += [f"{self.root / 'images'}: id {i} has {len(files)} image files "
                     f"({', '.join(f.name for f in files)}); keep one"
                     for i, files in self.images.items() if len(files) > 1]
        for name, ids in (splits or {}).items():
            listed = self.list_file(name)
            problems += [f"{listed}: id {i} has no image and mask pair; fix the list or add the files"
                         for i in ids if listed is not None and not (i in self.images and i in self.masks)]
        return problems

    def list_file(self, split: str) -> Path | None:
        """The split file a split's ids come from (None: drawn at random)."""
        path = self.root / "splits" / f"{split}.txt"
        return path if path.is_file() else None

    def splits(self, subset: int | None = None, check_files: bool = True) -> dict[str, list[str]]:
        """Ids per split: ``splits/<split>.txt`` where the folder has them, else a seeded random split of the ids
        that have an image and a mask. ``check_files``: refuse (one line, the count and the first few) what the
        checker calls a pairing error."""
        problems = self.pairing_problems()
        if problems and check_files:
            raise DatasetError(f"{self.root}: {len(problems)} image/mask problems (first: {problems[0]}); run "
                               f"python -m segvoc.data.check data=folder data.root={self.root} to list them all")
        paired = sorted(i for i in self.images if i in self.masks)
        if (self.root / "splits").is_dir():
            out = {s: read_ids(f) for s in SPLITS if (f := self.root / "splits" / f"{s}.txt").is_file()}
            unknown = [(s, i) for s, ids in out.items() for i in ids if i not in paired]
            if unknown and check_files:
                s, i = unknown[0]
                raise DatasetError(f"{self.root / 'splits' / (s + '.txt')}: id {i} has no image and mask pair "
                                   f"({len(unknown)} such ids); fix the list or add the files")
            for s in ("train", "val"):
                if s not in out:
                    raise DatasetError(f"{self.root / 'splits'}: no {s}.txt; give train.txt and val.txt (test.txt "
                                       "optional), or delete splits/ to split at random")
        else:
            ids = list(paired)
            random.Random(self.split_seed).shuffle(ids)
            n_test = int(round(len(ids) * self.test_fraction))
            n_val = int(round(len(ids) * self.val_fraction))
            out = {"train": sorted(ids[n_test + n_val:]), "val": sorted(ids[n_test:n_test + n_val]),
                   "test": sorted(ids[:n_test])}
        if subset:
            out = {k: v[:subset] for k, v in out.items()}
        for name in ("train", "val"):
            if not out.get(name):
                raise DatasetError(f"{self.root}: split {name!r} is empty ({len(paired)} image/mask pairs); raise "
                                   f"data.{'val_fraction' if name == 'val' else 'subset'} or add pairs")
        out.setdefault("test", [])
        return out

    def image_path(self, split: str, i: str) -> Path:
        files = self.images.get(i)
        return files[0] if files else self.root / "images" / f"{i}.jpg"

    def mask_path(self, split: str, i: str) -> Path:
        return self.masks.get(i, self.root / "masks" / f"{i}.png")
