"""SBD (Hariharan et al., 2011) to the standard VOC ``train_aug`` split: ``SegmentationClassAug/*.png`` and
``ImageSets/Segmentation/train_aug.txt`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted (10,582 ids with
the real archives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.progress import track

from segvoc.data.io import save_palette_mask
from segvoc.data.voc import read_id_list
from segvoc.errors import DatasetError
from segvoc.utils import atomic_write, atomic_write_text


def train_aug_ids(voc: Path, sbd: Path) -> list[str]:
    """(SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted."""
    sets = voc / "ImageSets" / "Segmentation"
    union = set(read_id_list(sbd / "train.txt")) | set(read_id_list(sbd / "val.txt")) | set(read_id_list(sets /
                                                                                                       "train.txt"))
    return sorted(union - set(read_id_list(sets / "val.txt")))


def sbd_mask(path: Path) -> np.ndarray:
    """Class indices (H, W uint8) of an SBD ``cls/<id>.mat`` (``GTcls.Segmentation``)."""
    from scipy.io import loadmat

    try:
        mask = loadmat(str(path), struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read SBD mask ({type(exc).__name__}); re-extract benchmark.tgz") from None
    return np.ascontiguousarray(mask, dtype=np.uint8)


def build_marker(voc: Path) -> Path:
    """The file that says ``SegmentationClassAug`` and ``train_aug.txt`` are complete."""
    return voc / "SegmentationClassAug" / ".complete"


def build_train_aug(voc: Path, sbd: Path) -> int:
    """Write one palette PNG per ``train_aug`` id (VOC's own mask where VOC has one: it carries the 255 borders;
    else SBD's), each atomically, skipping those already written; then ``train_aug.txt`` and the completion marker.
    Returns the number of ids."""
    out = voc / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    ids = train_aug_ids(voc, sbd)
    for i in track(ids, description="building SegmentationClassAug", transient=True, disable=len(ids) < 200):
        target = out / f"{i}.png"
        if not target.is_file():
            own = voc / "SegmentationClass" / f"{i}.png"
            if own.is_file():
                atomic_write(target, lambda f, src=own: f.write(src.read_bytes()), binary=True)
            else:
                mask = sbd_mask(sbd / "cls" / f"{i}.mat")
                atomic_write(target, lambda f, m=mask: save_palette_mask(m, f), binary=True)
        image, sbd_image = voc / "JPEGImages" / f"{i}.jpg", sbd / "img" / f"{i}.jpg"
        if not image.is_file() and sbd_image.is_file():  # VOC 2012 holds SBD's images; copy any it lacks
            atomic_write(image, lambda f, src=sbd_image: f.write(src.read_bytes()), binary=True)
    atomic_write_text(voc / "ImageSets" / "Segmentation" / "train_aug.txt", "\n".join(ids) + "\n")
    atomic_write_text(build_marker(voc), f"{len(ids)} ids\n")
    return len(ids)
