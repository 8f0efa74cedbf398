"""Folder datasets made for the tests (``data=folder``): learnable scenes of N classes at odd sizes, with both mask
kinds (one-channel ``L`` and palette ``P``) and both image kinds (``.jpg`` and ``.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from segvoc.data.synthetic import render_scene

SIZES = ((45, 61), (52, 37), (40, 48))  # odd sizes, both orientations


def make_folder_dataset(root: Path, names: Sequence[str], n: int = 18, seed: int = 0,
                        colors: Sequence[Sequence[int]] | None = None, splits: dict[str, list[str]] | None = None,
                        ignore_index: int = 255) -> Path:
    """Write ``root/{images,masks,classes.yaml}`` (and ``splits/`` when given): ``n`` scenes whose objects are
    classes 1..N-1 on class 0; even ids are ``.jpg`` with ``L`` masks, odd ids ``.png`` with palette masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        h, w = SIZES[k % len(SIZES)]
        image, mask = render_scene(rng, h, w, list(range(1, len(names))))
        mask[mask == 255] = ignore_index
        ident = f"scene_{k:03d}"
        if k % 2 == 0:
            cv2.imwrite(str(root / "images" / f"{ident}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{ident}.png")
        else:
            Image.fromarray(image).save(root / "images" / f"{ident}.png")
            palette_mask = Image.fromarray(mask, mode="P")
            palette_mask.putpalette([v for c in range(256) for v in ((c * 40) % 256, (c * 90) % 256, c)])
            palette_mask.save(root / "masks" / f"{ident}.png")
    classes: dict = {"names": list(names)}
    if colors is not None:
        classes["colors"] = [list(c) for c in colors]
    if ignore_index != 255:
        classes["ignore_index"] = ignore_index
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    if splits is not None:
        (root / "splits").mkdir()
        for name, ids in splits.items():
            (root / "splits" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root
