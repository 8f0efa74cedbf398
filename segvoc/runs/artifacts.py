"""``RunArtifacts``: what a training run writes about itself, as a callback (``conf/callbacks/default.yaml``).

- when the fit starts (rank 0): ``tracker.json``, the tracker runs a resumed launch continues;
- when the best checkpoint has been scored on the test split (``segvoc.engine.fitting.score_best_checkpoint``; rank
  0): the per-image rows, ``confusion.json``, ``metrics.json``, ``MODEL_CARD.md``, and the trackers' finish (final
  scores, artifacts, figures).

The run is marked finished only after all of them, by ``segvoc.runs.lifecycle.Run.commit`` (rule C).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from segvoc.runs.directory import split_entry, write_scores
from segvoc.runs.model_card import FitSummary, device_name, write_model_card
from segvoc.runs.trackers import finish_trackers, record_trackers, tracker_lines


def run_metrics(task: Any, epoch: int | None) -> dict[str, Any]:
    """``metrics.json`` of a scored task: ``{split: entry}`` for the splits it scored (``split_entry``)."""
    return {split: split_entry(task.scores[split], epoch, task.class_names) for split in ("val", "test")
            if split in task.scores}


def scored_epoch(trainer: pl.Trainer, task: Any) -> int | None:
    """The epoch of the checkpoint that was scored (the last one loaded), else the trainer's."""
    return task.loaded_epoch if task.loaded_epoch is not None else trainer.current_epoch


class RunArtifacts(pl.Callback):
    """Writes a training run's files into ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._started: float | None = None
        self.fit: FitSummary | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        if trainer.is_global_zero:
            record_trackers(self.run_dir, trainer.loggers)  # before training: a killed run can be continued

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - (self._started or time.perf_counter())
        self.fit = FitSummary(seconds, trainer.current_epoch, trainer.global_step, None,
                              resumed=bool(trainer.ckpt_path))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or "val" not in getattr(pl_module, "scores", {}):
            return
        epoch = scored_epoch(trainer, pl_module)
        metrics = run_metrics(pl_module, epoch)
        cfg = OmegaConf.create(pl_module.hparams.get("cfg") or {})
        write_scores(self.run_dir, pl_module.scores, metrics)
        if self.fit is not None:
            self.fit.best_epoch = epoch
        write_model_card(self.run_dir, cfg, pl_module.model, self.fit, device_name(pl_module.device),
                         tracking=tracker_lines(self.run_dir), class_names=pl_module.class_names)
        finish_trackers(trainer.loggers, self.run_dir, cfg, metrics, pl_module.hparams.get("cfg", {}),
                        pl_module.class_names, trainer.global_step, confusion=pl_module.scores["test"]["confusion"])
