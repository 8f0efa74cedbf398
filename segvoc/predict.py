"""``python -m segvoc.predict ckpt=<path> input=<image or folder> [output=<dir>]``: masks for any images.

For each image (JPEG/PNG, any size; RGB, grayscale, RGBA, 16-bit, EXIF-rotated) writes ``<name>.png``, a VOC
palette mask of the image's size (values 0-20), and ``<name>_overlay.png`` with a legend of the classes present.
Unreadable files are skipped and listed at the end; the exit code is non-zero only if nothing was processed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import cv2
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from rich.progress import track

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.checkpoint import load_task
from segvoc.cli import run_app
from segvoc.data.io import save_palette_mask
from segvoc.data.palette import VOC_CLASSES, VOC_COLORMAP
from segvoc.errors import DatasetError
from segvoc.inference import InferenceConfig
from segvoc.task import SegmentationTask
from segvoc.visualize import overlay

log = logging.getLogger("segvoc.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_rgb(path: Path) -> np.ndarray:
    """Any common image as RGB uint8 (H,W,3): EXIF orientation applied, 16-bit scaled, alpha dropped."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def list_inputs(inp: Path) -> list[Path]:
    """The image files named by ``input`` (a file, or a folder searched non-recursively)."""
    if inp.is_file():
        return [inp]
    if not inp.is_dir():
        raise DatasetError(f"input={inp}: no such file or folder")
    return sorted(p for p in inp.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@torch.no_grad()
def predict_mask(task: SegmentationTask, image: np.ndarray, max_side: int = 2048) -> np.ndarray:
    """Class-index mask (H,W uint8) for one RGB image, at the image's own size."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    src = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else image
    x = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None].to(task.device)
    scores, _ = task.predict_scores(x)
    mask = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
    if scale < 1:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The blended overlay with a legend strip (colour swatch + class name) for the classes present."""
    blended = overlay(image, mask, alpha)
    present = [int(c) for c in np.unique(mask) if c < len(VOC_CLASSES)]
    row_h = max(18, image.shape[0] // 25)
    legend = np.full((row_h * len(present) + 8, max(170, image.shape[1] // 4), 3), 255, np.uint8)
    for k, c in enumerate(present):
        y = 4 + k * row_h
        cv2.rectangle(legend, (6, y + 2), (6 + row_h - 4, y + row_h - 2), VOC_COLORMAP[c].tolist(), -1)
        cv2.putText(legend, VOC_CLASSES[c], (row_h + 8, y + row_h - 5), cv2.FONT_HERSHEY_SIMPLEX,
                    row_h / 36, (0, 0, 0), 1, cv2.LINE_AA)
    h = max(blended.shape[0], legend.shape[0])
    canvas = np.full((h, blended.shape[1] + legend.shape[1], 3), 255, np.uint8)
    canvas[: blended.shape[0], : blended.shape[1]] = blended
    canvas[: legend.shape[0], blended.shape[1]:] = legend
    return canvas


def predict(cfg: DictConfig) -> dict[str, list[str]]:
    """Run the model over ``cfg.input``; returns ``{"done": [...], "failed": [...]}``."""
    inputs = list_inputs(Path(cfg.input).expanduser())
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    task, _ = load_task(cfg.ckpt, InferenceConfig(**OmegaConf.to_container(cfg.infer, resolve=True)))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    task.to(device)
    done, failed = [], []
    for path in track(inputs, description="predicting", disable=len(inputs) < 2):
        try:
            image = read_rgb(path)
        except DatasetError as exc:
            failed.append(f"{path}: {exc}")
            continue
        mask = predict_mask(task, image, int(cfg.max_side))
        save_palette_mask(mask, out / f"{path.stem}.png")
        Image.fromarray(overlay_with_legend(image, mask, float(cfg.alpha))).save(out / f"{path.stem}_overlay.png")
        done.append(str(path))
    log.info("%d masks written to %s", len(done), out)
    if failed:
        print(f"skipped {len(failed)} unreadable file(s):\n  " + "\n  ".join(failed), file=sys.stderr)
    if not done:
        raise DatasetError(f"input={cfg.input}: no image could be processed")
    return {"done": done, "failed": failed}


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_app(predict, cfg)


if __name__ == "__main__":
    main()
