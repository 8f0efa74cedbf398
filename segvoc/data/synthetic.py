"""A deterministic, learnable VOC-format dataset for offline demos and tests.

Each scene has a textured background and 1-3 objects. Every object class has its own colour, stripe
texture and shape, so a segmentation model can learn it; masks carry a 255 border like VOC's.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from segvoc.data.io import save_palette_mask
from segvoc.data.palette import IGNORE_INDEX
from segvoc.safety import ownership
from segvoc.utils import file_lock, process_umask

DEFAULT_CLASSES = (1, 7, 8, 12, 15)  # aeroplane, car, cat, dog, person


def _class_style(k: int, n: int) -> tuple[np.ndarray, int, float, int]:
    """Colour (RGB), shape id, stripe angle and stripe period for the k-th of n object classes."""
    hue = int(180 * k / n)
    rgb = cv2.cvtColor(np.uint8([[[hue, 220, 230]]]), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    return rgb, k % 3, np.pi * k / n, 4 + 2 * (k % 4)


def _draw_shape(h: int, w: int, shape: int, cy: float, cx: float, r: float, rng: np.random.Generator) -> np.ndarray:
    region = np.zeros((h, w), np.uint8)
    if shape == 0:
        cv2.ellipse(region, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.6, 1.0))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif shape == 1:
        pts = cv2.boxPoints(((cx, cy), (2 * r, 1.3 * r), float(rng.uniform(0, 90))))
        cv2.fillPoly(region, [pts.astype(np.int32)], 1)
    else:
        ang = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([cx + 1.2 * r * np.cos(ang), cy + 1.2 * r * np.sin(ang)], 1)
        cv2.fillPoly(region, [pts.astype(np.int32)], 1)
    return region.astype(bool)


def render_scene(rng: np.random.Generator, height: int, width: int, classes: Sequence[int],
                 border: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image (H,W,3 uint8) and its index mask (H,W uint8 with a 255 border around objects)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 140, 3).astype(np.float32)
    low = cv2.resize(rng.normal(0, 25, (6, 8, 3)).astype(np.float32), (width, height))
    image = base + low + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    edges = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(classes)))
        rgb, shape, angle, period = _class_style(k, len(classes))
        r = rng.uniform(0.15, 0.3) * min(height, width)
        cy, cx = rng.uniform(r * 0.6, height - r * 0.6), rng.uniform(r * 0.6, width - r * 0.6)
        region = _draw_shape(height, width, shape, cy, cx, r, rng)
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        obj = rgb * (0.8 + 0.2 * stripes[..., None]) + rng.normal(0, 8, (height, width, 3))
        image[region] = obj[region]
        mask[region] = classes[k]
        kernel = np.ones((2 * border + 1, 2 * border + 1), np.uint8)
        edge = cv2.dilate(region.astype(np.uint8), kernel) & ~cv2.erode(region.astype(np.uint8), kernel)
        edges |= edge.astype(bool)
    mask[edges] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), mask


def generate(root: str | Path, num_train: int = 160, num_val: int = 80, height: int = 120, width: int = 160,
             classes: Sequence[int] = DEFAULT_CLASSES, seed: int = 0,
             sizes: Sequence[Sequence[int]] | None = None, jpeg_quality: int = 92) -> Path:
    """Write the tree ``root/VOCdevkit/VOC2012`` (skipped when an identical one exists); return VOC2012's path.

    Every image is ``height`` x ``width``, or, with ``sizes`` (a list of ``[h, w]``), of a size drawn from that
    list per image (e.g. VOC's ``[[375, 500], [500, 375], [333, 500]]``), saved as JPEG at ``jpeg_quality``.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "height": height, "width": width,
              "classes": list(classes), "seed": seed, "version": 1}
    if sizes is not None or jpeg_quality != 92:  # keeps the markers (and caches) of earlier trees valid
        params.update(sizes=[[int(h), int(w)] for h, w in sizes or [[height, width]]], jpeg_quality=int(jpeg_quality))
    voc = root / "VOCdevkit" / "VOC2012"
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == params and voc.is_dir():
        return voc
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock", "data.root"):  # one writer; DDP ranks and sweep jobs wait
        if marker.is_file() and json.loads(marker.read_text()) == params and voc.is_dir():
            return voc
        check_root(root)  # refused before the tree is drawn, not after
        _write_tree(root, params, classes)
    return voc


def _write_tree(root: Path, params: dict, classes: Sequence[int]) -> None:
    num_train, num_val, height, width, seed = (params[k] for k in ("num_train", "num_val", "height", "width", "seed"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    tmp.chmod(0o777 & ~process_umask())  # mkdtemp's 0700 would hide a shared cache_dir's tree from lab mates
    tvoc = tmp / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tvoc / d).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sizes = params.get("sizes") or [[height, width]]
    quality = int(params.get("jpeg_quality", 92))
    ids = {"train": [f"syn_train_{i:05d}" for i in range(num_train)],
           "val": [f"syn_val_{i:05d}" for i in range(num_val)]}
    for split_ids in ids.values():
        for i in split_ids:
            h, w = sizes[int(rng.integers(len(sizes)))] if len(sizes) > 1 else sizes[0]
            image, mask = render_scene(rng, h, w, classes)
            cv2.imwrite(str(tvoc / "JPEGImages" / f"{i}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
            save_palette_mask(mask, tvoc / "SegmentationClass" / f"{i}.png")
    sets = tvoc / "ImageSets" / "Segmentation"
    for name, split_ids in ids.items():
        (sets / f"{name}.txt").write_text("\n".join(split_ids) + "\n")
    (sets / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
    (tmp / "synthetic.json").write_text(json.dumps(params))
    ownership.claim(tmp, "synthetic")
    # rule A: an earlier generated tree is replaced; anything else at data.root is never deleted
    ownership.replace_owned(tmp, root, "synthetic", legacy_tree, _fix(root))


def check_root(root: str | Path) -> None:
    """``OwnershipError`` unless ``root`` is new, empty, or a synthetic tree segvoc generated (rule A: generating
    replaces what is there)."""
    root = Path(root)
    if not ownership.is_empty(root):
        ownership.check_owned(root, "synthetic", legacy_tree, _fix(root))


def _fix(root: Path) -> str:
    return (f"data=synthetic generates its images into data.root={root}: point data.root at a new or empty folder "
            "(or at a synthetic tree segvoc generated)")


def legacy_tree(folder: Path) -> bool:
    """A synthetic tree of segvoc 0.4 and earlier (no ownership marker): its ``synthetic.json`` and
    ``VOCdevkit``."""
    return (folder / "synthetic.json").is_file() and (folder / "VOCdevkit" / "VOC2012").is_dir()
