"""Checking a whole dataset before a long run: decode every image and mask of every split, count class pixels, and
list every problem training would refuse (errors) and every likely labelling mistake (warnings), each naming its
file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich.progress import track

from segvoc.data.io import load_image, load_mask, out_of_range
from segvoc.data.layouts import dataset_classes, open_layout
from segvoc.errors import DatasetError
from segvoc.tables import markdown_table


def check_dataset(data: Mapping, progress: bool = True) -> dict[str, Any]:
    """Every pair of every split of the dataset ``data`` describes, decoded once. Returns ``{"root", "splits": {name:
    n}, "classes": [names], "counts": [pixels per class], "train_counts", "ignored", "errors": [...],
    "warnings": [...]}``.

    Errors (what training refuses): an image without its mask or the reverse, an id with two image files, a file
    that cannot be read, an image and mask of different sizes, a mask value that is neither a class nor the ignore
    label (its values and pixel counts), a colour mask without colours. Warnings: no pixel of class 0 anywhere (with
    labels 1..N: the reduce-zero-label mistake), a class with no pixel in train, a mask that is all ignore. A layout
    or split-list error raises ``DatasetError`` at once (nothing else can be checked then).
    """
    classes = dataset_classes(data)
    layout = open_layout(data, classes)
    splits = layout.splits(data.get("subset"), check_files=False)
    errors = layout.pairing_problems(splits)
    n = classes.num_classes
    counts, train_counts, ignored = np.zeros(n, np.int64), np.zeros(n, np.int64), 0
    high_values: set[int] = set()
    warnings: list[str] = []
    for name, ids in splits.items():
        for i in track(ids, description=f"checking {name}", disable=not progress, transient=True):
            image_path, mask_path = layout.image_path(name, i), layout.mask_path(name, i)
            if not (image_path.is_file() and mask_path.is_file()):
                continue  # listed among the pairing errors
            try:
                image = load_image(image_path)
                raw = load_mask(mask_path, 255, 255, classes.colors)  # every value, to count what is wrong
            except DatasetError as exc:
                errors.append(str(exc))
                continue
            if image.shape[:2] != raw.shape:
                errors.append(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                              f"{image.shape[1]}x{image.shape[0]}; the pair must have the same size")
            bad = out_of_range(raw, n, classes.ignore_index)
            if bad:
                high_values |= set(bad)
                shown = ", ".join(f"{v} ({px} px)" for v, px in list(bad.items())[:8])
                errors.append(f"{mask_path}: values {shown} are neither a class (0-{n - 1}) nor the ignore label "
                              f"{classes.ignore_index}")
            per_class = np.bincount(raw.reshape(-1), minlength=256)
            counts += per_class[:n]
            ignored += int(per_class[classes.ignore_index])
            if name == "train":
                train_counts += per_class[:n]
            if per_class[classes.ignore_index] == raw.size:
                warnings.append(f"{mask_path}: every pixel is the ignore label {classes.ignore_index}; the image "
                                "teaches nothing")
    if counts[0] == 0 and (counts.any() or high_values):
        mistake = (f" and labels run 1..{n}: the reduce-zero-label mistake (labels must run 0..{n - 1}; subtract 1 "
                   f"from every label)" if n in high_values else "")
        warnings.append(f"no pixel of class 0 ({classes.names[0]}) in any mask{mistake}")
    missing = [classes.names[c] for c in range(n) if train_counts[c] == 0 and splits.get("train")]
    if missing:
        warnings.append(f"no pixel of {', '.join(missing)} in the training masks: the model never sees "
                        f"{'it' if len(missing) == 1 else 'them'}")
    return {"root": str(layout.root), "splits": {k: len(v) for k, v in splits.items()}, "classes": list(classes.names),
            "counts": counts.tolist(), "train_counts": train_counts.tolist(), "ignored": ignored, "errors": errors,
            "warnings": warnings}


def print_summary(report: dict[str, Any], max_problems: int = 20) -> None:
    """Ids per split, the class-pixel table under the dataset's names, the errors and warnings of a
    ``check_dataset`` report; a ``DatasetError`` naming the dataset when there is any error."""
    total = max(1, sum(report["counts"]))
    print(f"dataset: {report['root']}")
    print("ids per split: " + ", ".join(f"{k} {v}" for k, v in report["splits"].items()))
    rows = [(name, n, n / total, t) for name, n, t in zip(report["classes"], report["counts"], report["train_counts"],
                                                         strict=True)]
    print(markdown_table(("class", "pixels", "fraction", "in train"), rows))
    print(f"ignored pixels: {report['ignored']}")
    for kind in ("warnings", "errors"):
        found = report[kind]
        if found:
            shown = found[:max_problems]
            more = f" ({len(found) - len(shown)} more not listed)" if len(found) > len(shown) else ""
            print(f"{len(found)} {kind[:-1]}(s){more}:\n  " + "\n  ".join(shown))
    if report["errors"]:
        raise DatasetError(f"{report['root']}: {len(report['errors'])} error(s) that training would refuse; fix them "
                           "or remove their ids from the split lists")
    print("no errors found")


def check_configured(data: Mapping, max_problems: int = 20) -> dict[str, Any]:
    """``check_dataset`` of a run config's ``data`` node, then ``print_summary``."""
    report = check_dataset(data)
    print_summary(report, max_problems)
    return report
