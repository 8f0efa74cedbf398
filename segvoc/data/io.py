"""Reading VOC images and masks from disk; every problem becomes a one-line ``DatasetError``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segvoc.data.palette import IGNORE_INDEX, VOC_COLORMAP, palette_bytes, rgb_to_index
from segvoc.errors import DatasetError


def load_image(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); EXIF orientation is applied."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:  # missing, or gone between a check and the read
        raise DatasetError(f"{path}: image file is missing; restore it or remove its id from the split list") from None
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error:  # some corrupt streams raise instead of returning None
        img = None
    if img is None:
        raise DatasetError(f"{path}: cannot decode image (corrupt or not an image); re-extract or replace it")
    if path.suffix.lower() in (".jpg", ".jpeg") and not data[-2:].tobytes() == b"\xff\xd9":
        raise DatasetError(f"{path}: JPEG is truncated (no end-of-image marker); re-extract or replace it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_mask(path: Path, num_classes: int = 21, ignore_index: int = IGNORE_INDEX,
              colors: Sequence[Sequence[int]] | np.ndarray | None = VOC_COLORMAP[:21]) -> np.ndarray:
    """Read a mask as class indices uint8 (H, W): 0..num_classes-1, ``ignore_index`` (255) = not labelled.

    One-channel PNGs (palette 'P' or grayscale 'L', e.g. SBD's ``SegmentationClassAug``) hold the indices; a colour
    mask (RGB) is read through ``colors`` (one colour per class; default VOC's 21), refused without them. Any other
    value is a ``DatasetError`` naming the file, the values with their pixel counts, and ``data.num_classes``.
    """
    if not Path(path).is_file():
        raise DatasetError(f"{path}: mask file is missing; restore it or remove its id from the split list")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: cannot read mask ({exc}); re-extract or replace it") from None
    if mode in ("RGB", "RGBA"):
        if colors is None:
            raise DatasetError(f"{path}: mask is a colour image and classes.yaml gives no colors; add colors: "
                               "[[r, g, b], ...] (one per class, in index order) or save masks as one-channel PNGs "
                               "of class indices")
        idx = rgb_to_index(arr[..., :3], colors, ignore_index)
        if idx is None:
            raise DatasetError(
                f"{path}: mask is a colour image with colours outside the {len(colors)} class colours; save masks as "
                f"palette PNGs of class indices 0-{num_classes - 1} ({ignore_index} = ignore), or fix the colours"
            )
        return idx
    if mode not in ("P", "L"):
        raise DatasetError(f"{path}: mask mode {mode!r} is not supported; save it as a palette or 8-bit PNG")
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    bad = out_of_range(arr, num_classes, ignore_index)
    if bad:
        shown = ", ".join(f"{v} ({n} px)" for v, n in list(bad.items())[:8])
        raise DatasetError(
            f"{path}: mask has values {shown} outside 0-{num_classes - 1} and {ignore_index} (data.num_classes="
            f"{num_classes}); fix the mask, map those labels to {ignore_index} (ignore), or raise data.num_classes"
        )
    return arr


def out_of_range(mask: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> dict[int, int]:
    """``{value: pixel count}`` of the mask's values that are neither a class (0..num_classes-1) nor the ignore
    label."""
    counts = np.bincount(mask.reshape(-1), minlength=256)
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[ignore_index] = True
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts * ~valid)}


def save_palette_mask(mask: np.ndarray, path: Path | BinaryIO, palette: np.ndarray = VOC_COLORMAP) -> None:
    """Write a class-index mask (H, W uint8) as a palette PNG in the dataset's colours (to a path or an open binary
    file): pixel values are class indices."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(palette_bytes(palette))
    im.save(path, format="PNG")


def read_rgb(path: Path) -> np.ndarray:
    """Any common image as RGB uint8 (H,W,3): EXIF orientation applied, alpha dropped. Deeper images are scaled by
    their type's range, never by their own values: 16-bit by 65535 (Pillow does the same for 16-bit RGB), float by 1
    (values 0-1); a float image outside 0-1 and a 32-bit integer image have no known range and are refused."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            gray = _deep_gray_to_uint8(im, path)
            return np.asarray(im.convert("RGB")) if gray is None else np.repeat(gray[..., None], 3, axis=2)
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def _deep_gray_to_uint8(im: Image.Image, path: Path) -> np.ndarray | None:
    """A 16-bit, 32-bit or float single-channel image as uint8 (H,W) scaled by its type's range; None for others."""
    sixteen = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")  # older Pillow: "I" for PNG
    if sixteen:
        return np.round(np.asarray(im, dtype=np.float64) / 65535 * 255).clip(0, 255).astype(np.uint8)
    if im.mode == "I":
        raise DatasetError(f"{path}: 32-bit integer image has no known range; save it as 8- or 16-bit")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DatasetError(f"{path}: float image with values outside 0-1 (min {np.nanmin(arr):g}, max "
                               f"{np.nanmax(arr):g}); scale it to 0-1 or save it as 8- or 16-bit")
        return np.round(arr * 255).astype(np.uint8)
    return None
