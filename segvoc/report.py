"""``python -m segvoc.report sweep=<dir or list> [output=<dir>]``: the report's tables and figures from runs.

Reads each run's ``metrics.json``, ``.hydra/config.yaml``, ``confusion.json`` and TensorBoard scalars; writes
``results.md``/``results.csv`` (runs beside the report's published figures, plus per-class IoU), ``summary.csv`` and
``per_class_iou_by_group.png`` (runs that differ only in ``seed`` grouped: mean ± std),
``<run>_loss.png`` (Figures 1, 2, 4), ``<run>_predictions.png`` (Figures 3, 5), ``<run>_confusion.png`` and
``failure_gallery.png`` (the ``gallery`` worst test images of the best group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.reporting.study import build_report


def report(cfg: DictConfig) -> dict[str, Any]:
    sweep = list(cfg.sweep) if isinstance(cfg.sweep, ListConfig) else str(cfg.sweep)
    published = OmegaConf.to_container(cfg.published, resolve=True)
    result = build_report(sweep, Path(cfg.output), published, int(cfg.num_images), cfg.confusion_split, cfg.device,
                          OmegaConf.to_container(cfg.stats, resolve=True), int(cfg.gallery))
    print((Path(cfg.output) / "results.md").read_text())
    print(f"figures: {len(result['figures'])} PNGs in {cfg.output}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_app(report, cfg)


if __name__ == "__main__":
    main()
