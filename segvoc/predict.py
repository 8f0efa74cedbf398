"""``python -m segvoc.predict ckpt=<path> input=<image or folder> [output=<dir>]``: masks for any images.

For each image (JPEG/PNG, any size; RGB, grayscale, RGBA, 16-bit, EXIF-rotated) writes ``<name>.png``, a VOC
palette mask of the image's size (values 0-20), and ``<name>_overlay.png`` with a legend of the classes present.
An input that fails gets one line and is skipped; a summary comes at the end, and the exit code is 2 if any input
failed. The work is done by ``segvoc.deploy.predicting``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.deploy.exported import load_any_task
from segvoc.deploy.predicting import check_all_done, list_inputs, predict_inputs
from segvoc.evaluation.inference import InferenceConfig


def predict(cfg: DictConfig) -> dict[str, list[str]]:
    """Run the model over ``cfg.input``; returns ``{"done": [...], "failed": ["<input>: <reason>", ...]}``."""
    inputs = list_inputs(Path(cfg.input).expanduser())
    task, _ = load_any_task(cfg.ckpt, InferenceConfig(**OmegaConf.to_container(cfg.infer, resolve=True)),
                            cfg.get("trusted_targets") or ())
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    task.to(device)
    return predict_inputs(task.predict_log_probs, inputs, Path(cfg.output), device, int(cfg.max_side),
                          float(cfg.alpha), task.class_names, task.palette, reraise=bool(cfg.traceback))


def predict_and_check(cfg: DictConfig) -> dict[str, list[str]]:
    """``predict``, then a one-line error (exit code 2) if any input failed."""
    return check_all_done(predict(cfg), cfg.input)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_app(predict_and_check, cfg)


if __name__ == "__main__":
    main()
