"""Checking a whole VOC tree: decode every image and mask of every split, count class pixels, list problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from segvoc.data.palette import VOC_CLASSES
from segvoc.data.voc import VOCPairs, make_splits, mask_dir_for, missing_files, resolve_voc_root, split_file
from segvoc.errors import DatasetError
from segvoc.tables import markdown_table


def check_tree(root: str | Path, train_split: str = "train", test_fraction: float = 0.5, split_seed: int = 0,
               subset: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Decode every pair of every split; returns ``{"splits": {name: n}, "counts": [n per class], "problems": []}``.

    Every problem of the pairs is listed in one pass: for each id without its image or mask, which file is
    missing; then every image or mask of the other ids that cannot be decoded or holds values outside the classes.
    Layout and split-list errors raise ``DatasetError`` at once (nothing else can be checked then).
    """
    voc = resolve_voc_root(root)
    splits = make_splits(voc, train_split, test_fraction, split_seed, subset, check_files=False)
    counts = np.zeros(256, np.int64)
    problems: list[str] = []
    for name, ids in splits.items():
        mask_dir = mask_dir_for(voc, name, train_split)
        missing = missing_files(voc, ids, mask_dir)
        listed_in = split_file(voc, name, train_split)
        problems += [f"{listed_in}: id {i} has no {' and no '.join(lacks)} (under {voc}); restore it or remove the "
                     "id from the list" for i, lacks in missing.items()]
        ds = VOCPairs(voc, [i for i in ids if i not in missing], mask_dir)
        for k in track(range(len(ds)), description=f"checking {name}", disable=not progress, transient=True):
            try:
                _, mask = ds.load(k)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            counts += np.bincount(mask.reshape(-1), minlength=256)
    return {"root": str(voc), "splits": {k: len(v) for k, v in splits.items()},
            "counts": counts[:len(VOC_CLASSES)].tolist(), "ignored": int(counts[255]), "problems": problems}


def print_summary(report: dict[str, Any], max_problems: int = 20) -> None:
    """Ids per split, class pixel counts and the problems of a ``check_tree`` report; a ``DatasetError`` naming
    the tree when there is any problem."""
    total = max(1, sum(report["counts"]))
    print(f"VOC tree: {report['root']}")
    print("ids per split: " + ", ".join(f"{k} {v}" for k, v in report["splits"].items()))
    rows = [(VOC_CLASSES[c], n, n / total) for c, n in enumerate(report["counts"])]
    print(markdown_table(("class", "pixels", "fraction"), rows))
    print(f"ignored (255) pixels: {report['ignored']}")
    problems = report["problems"]
    if problems:
        shown = problems[:max_problems]
        print(f"{len(problems)} problem(s):\n  " + "\n  ".join(shown))
        more = len(problems) - len(shown)
        listed = f" ({more} not listed)" if more > 0 else ""
        raise DatasetError(f"{report['root']}: {len(problems)} bad image/mask pair(s){listed}; "
                           "fix them or remove their ids from the split lists")
    print("no problems found")


def check_configured_tree(data: DictConfig, max_problems: int = 20) -> dict[str, Any]:
    """``check_tree`` with a run config's ``data`` node (root, splits, subset), then ``print_summary``."""
    report = check_tree(data.root, data.train_split, data.test_fraction, data.split_seed, data.subset)
    print_summary(report, max_problems)
    return report
