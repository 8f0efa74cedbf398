"""Masks for any images (``segvoc.predict``): list the inputs, name the outputs, read, predict, write, sum up.

Rules: predict never loses an input or an output.
- Every input gets its own outputs, ``<stem>.png`` (a VOC palette mask of class indices) and ``<stem>_overlay.png``;
  inputs whose outputs would be the same files (``a.jpg`` and ``a.png``) are refused, each in one line.
- No output is written over an input (``output=`` may be the input folder): such an input is refused in one line.
- Outputs are written atomically (``segvoc.utils.atomic_write``): a failed write leaves the old file or none.
- An input that fails (unreadable, refused, too odd for the model) gets one line and is skipped; the summary comes
  at the end, and the command exits non-zero if any input failed (``check_all_done``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from segvoc.data.io import read_rgb, save_palette_mask
from segvoc.errors import DatasetError, SegvocError
from segvoc.evaluation.figures import overlay_with_legend
from segvoc.evaluation.inference import predict_mask
from segvoc.utils import atomic_write, one_line

log = logging.getLogger("segvoc.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Planned:
    """One input and the two files it writes."""

    source: Path
    mask: Path
    overlay: Path


def list_inputs(inp: Path) -> list[Path]:
    """The image files named by ``input`` (a file, or a folder searched non-recursively), sorted."""
    if inp.is_file():
        return [inp]
    if not inp.is_dir():
        raise DatasetError(f"input={inp}: no such file or folder")
    return sorted(p for p in inp.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def output_names(source: Path, out: Path) -> tuple[Path, Path]:
    """The mask and overlay files of ``source`` in the folder ``out``."""
    return out / f"{source.stem}.png", out / f"{source.stem}_overlay.png"


def plan_outputs(inputs: Sequence[Path], out: Path) -> tuple[list[Planned], dict[Path, str]]:
    """Each input with its outputs, and the inputs refused (input -> one-line reason): those whose outputs another
    input would also write, and those with an output that is an input file (compared after resolving links)."""
    real = {Path(os.path.realpath(p)): p for p in inputs}
    writers: dict[Path, list[Path]] = {}
    for source in inputs:
        for target in output_names(source, out):
            writers.setdefault(Path(os.path.realpath(target)), []).append(source)
    planned, refused = [], {}
    for source in inputs:
        targets = output_names(source, out)
        for target in targets:
            resolved = Path(os.path.realpath(target))
            others = [s for s in writers[resolved] if s != source]
            if resolved in real:
                victim = real[resolved]
                what = "itself" if victim == source else f"the input {victim.name}"
                refused[source] = f"its output {target} would overwrite {what}; set output= to another folder"
                break
            if others:
                refused[source] = (f"{others[0].name} would write the same {target.name}; rename one of them or "
                                   "predict them into different folders")
                break
        else:
            planned.append(Planned(source, *targets))
    return planned, refused


def write_outputs(item: Planned, image: np.ndarray, mask: np.ndarray, alpha: float, class_names: Sequence[str],
                  palette: np.ndarray) -> None:
    """Write the palette mask (the dataset's colours; pixel values = class indices) and the overlay (legend in the
    dataset's names) of one input, each atomically."""
    overlay = overlay_with_legend(image, mask, alpha, class_names, palette)
    atomic_write(item.mask, lambda f: save_palette_mask(mask, f, palette), binary=True)
    atomic_write(item.overlay, lambda f: Image.fromarray(overlay).save(f, format="PNG"), binary=True)


def predict_inputs(forward: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[Path], out: Path,
                   device: str, max_side: int, alpha: float, class_names: Sequence[str], palette: np.ndarray,
                   reraise: bool = False) -> dict[str, list[str]]:
    """Predict and write every input, skipping (one line on stderr each) those that fail; returns
    ``{"done": [input, ...], "failed": ["<input>: <reason>", ...]}``. ``reraise``: let an error that is not a
    ``SegvocError`` through with its traceback (``traceback=true``) instead of skipping the input."""
    out.mkdir(parents=True, exist_ok=True)
    planned, refused = plan_outputs(inputs, out)
    failed = dict(refused)
    for source, reason in refused.items():
        _skipped(source, reason)
    done = []
    for item in track(planned, description="predicting", disable=len(planned) < 2):
        try:
            image = read_rgb(item.source)
            mask = predict_mask(forward, image, device, max_side)
            write_outputs(item, image, mask, alpha, class_names, palette)
        except Exception as exc:  # one odd input never stops the folder
            if reraise and not isinstance(exc, SegvocError):
                raise
            reason = str(exc) if isinstance(exc, SegvocError) else f"failed ({type(exc).__name__}: {exc})"
            failed[item.source] = one_line(reason.removeprefix(f"{item.source}: "))
            _skipped(item.source, failed[item.source])
            continue
        done.append(str(item.source))
    summary = {"done": done, "failed": [f"{s}: {failed[s]}" for s in inputs if s in failed]}
    log.info("%d of %d input(s) predicted; masks and overlays in %s", len(done), len(inputs), out)
    if failed:
        print(f"predicted {len(done)} of {len(inputs)} input(s) into {out}; {len(failed)} failed:\n  "
              + "\n  ".join(summary["failed"]), file=sys.stderr, flush=True)
    return summary


def _skipped(source: Path, reason: str) -> None:
    print(f"skipped {source}: {reason}", file=sys.stderr, flush=True)


def check_all_done(summary: dict[str, list[str]], inp: str) -> dict[str, list[str]]:
    """``summary`` itself when every input was predicted; otherwise a one-line ``DatasetError`` (exit code 2)."""
    if not summary["done"]:
        raise DatasetError(f"input={inp}: no image could be processed (see the lines above)")
    if summary["failed"]:
        total = len(summary["done"]) + len(summary["failed"])
        raise DatasetError(f"input={inp}: {len(summary['failed'])} of {total} input(s) failed (listed above); "
                           "the others were written")
    return summary
