"""``python -m segvoc.train [overrides]``: fit, then validate and test the best checkpoint.

Writes into the run directory: ``.hydra/``, ``checkpoints/{best,last}.ckpt``, ``tb/`` (TensorBoard), ``splits/``
(the ids used), ``metrics.json`` = ``{"val": {...}, "test": {...}}``, the per-image rows and ``MODEL_CARD.md``; with
``logger=mlflow|wandb`` also ``tracker.json``. The run directory's rules (ownership, lock, resume, commit last) are
``segvoc.runs.lifecycle``; the failure policy is ``segvoc.app.run_app``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from segvoc.app import run_app
from segvoc.engine.builders import build_datamodule, build_task, build_trainer, class_weights_for
from segvoc.engine.fitting import fit, score_best_checkpoint
from segvoc.runs.artifacts import run_metrics, scored_epoch
from segvoc.runs.lifecycle import open_run
from segvoc.runs.trackers import check_trackers, logger_kwargs

log = logging.getLogger("segvoc.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; returns (and writes) the metrics dict."""
    with open_run(cfg) as run:
        if run.metrics is not None:  # resume=auto on a finished run
            return run.metrics
        cfg = run.cfg
        check_trackers(cfg)
        pl.seed_everything(int(cfg.seed), workers=True)
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
        dm = build_datamodule(cfg, split_dir=run.dir / "splits")
        # Lightning calls dm.prepare_data() on local rank 0 of each node inside fit; only the class weights need
        # the training masks before that (every rank counts them; downloads are serialised by a lock)
        task = build_task(cfg, class_weights=class_weights_for(cfg, dm, prepare=True, record=run.dir))
        trainer = build_trainer(cfg, purge_step=run.purge_step, logger_kwargs=logger_kwargs(cfg, run.dir))
        fit(trainer, task, dm, run.ckpt_path, run.dir)
        score_best_checkpoint(trainer, task, dm)
        metrics = run_metrics(task, scored_epoch(trainer, task))
        if trainer.is_global_zero:
            log.info("val mIoU %.4f pixel acc %.4f | test mIoU %.4f pixel acc %.4f | %s", metrics["val"]["miou"],
                     metrics["val"]["pixel_acc"], metrics["test"]["miou"], metrics["test"]["pixel_acc"], run.dir)
        return run.commit(metrics)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the val ``cfg.optimized_metric`` for sweepers (Optuna), NaN for a failed job.
    Re-running a sweep in its directory skips finished jobs and resumes the rest (``resume=auto``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.get("resume") is None:
        with open_dict(cfg):
            cfg.resume = "auto"
    metrics = run_app(train, cfg)
    key = cfg.get("optimized_metric")
    return None if not key else float("nan") if metrics is None else metrics["val"][key]


if __name__ == "__main__":
    from segvoc.extras import exit_if_missing  # hydra/launcher=slurm, hparams_search=optuna: before Hydra composes
    exit_if_missing()
    main()
