"""``python -m segvoc.evaluate ckpt=<path> [split=test] [tta=none|flip|ms_flip]``: score a checkpoint.

``ckpt`` may also be a file written by ``segvoc.export`` (``.onnx``, TorchScript ``.pt``): it is scored with the
same loader and metric code, so its mIoU can be compared with the checkpoint's. Runs the same evaluation as training
(full-resolution images, dataset-level confusion matrix, bootstrap intervals), writes ``metrics.json``,
``confusion.json``, the per-image rows and ``per_class_iou.md`` into its run directory, and prints the table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from segvoc.app import run_app
from segvoc.engine.builders import build_trainer
from segvoc.runs.directory import split_entry, write_scores
from segvoc.runs.evaluation import evaluation_text, prepare_evaluation
from segvoc.utils import atomic_write_text

log = logging.getLogger("segvoc.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split``; returns (and writes) ``{split: scores}``."""
    out = Path(cfg.paths.output_dir)
    task, dm, epoch = prepare_evaluation(cfg)
    trainer = build_trainer(cfg, evaluation=True)
    (trainer.validate if cfg.split == "val" else trainer.test)(task, datamodule=dm, verbose=False)
    metrics = {cfg.split: split_entry(task.scores[cfg.split], epoch, task.class_names)}
    if trainer.is_global_zero:
        write_scores(out, task.scores, metrics)
        table, line = evaluation_text(cfg, task, metrics[cfg.split])
        atomic_write_text(out / "per_class_iou.md", table)
        print(table + "\n" + line, flush=True)
        log.info("%s mIoU %.4f -> %s", cfg.split, metrics[cfg.split]["miou"], out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app(evaluate, cfg)


if __name__ == "__main__":
    main()
