"""``python -m segvoc.predict ckpt=<path> input=<image or folder> [output=<dir>]``: masks for any images.

For each image (JPEG/PNG, any size; RGB, grayscale, RGBA, 16-bit, EXIF-rotated) writes ``<name>.png``, a VOC
palette mask of the image's size (values 0-20), and ``<name>_overlay.png`` with a legend of the classes present.
Unreadable files are skipped and listed at the end; the exit code is non-zero only if nothing was processed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import track

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.data.io import read_rgb, save_palette_mask
from segvoc.deploy.exported import load_any_task
from segvoc.errors import DatasetError
from segvoc.evaluation.figures import overlay_with_legend
from segvoc.evaluation.inference import InferenceConfig, predict_mask

log = logging.getLogger("segvoc.predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_inputs(inp: Path) -> list[Path]:
    """The image files named by ``input`` (a file, or a folder searched non-recursively)."""
    if inp.is_file():
        return [inp]
    if not inp.is_dir():
        raise DatasetError(f"input={inp}: no such file or folder")
    return sorted(p for p in inp.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def predict(cfg: DictConfig) -> dict[str, list[str]]:
    """Run the model over ``cfg.input``; returns ``{"done": [...], "failed": [...]}``."""
    inputs = list_inputs(Path(cfg.input).expanduser())
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    task, _ = load_any_task(cfg.ckpt, InferenceConfig(**OmegaConf.to_container(cfg.infer, resolve=True)),
                            cfg.get("trusted_targets") or ())
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    task.to(device)
    done, failed = [], []
    for path in track(inputs, description="predicting", disable=len(inputs) < 2):
        try:
            image = read_rgb(path)
        except DatasetError as exc:
            failed.append(f"{path}: {exc}")
            continue
        mask = predict_mask(task.predict_log_probs, image, device, int(cfg.max_side))
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
