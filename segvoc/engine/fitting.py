"""Running a fit, and scoring its best checkpoint: the two steps of ``segvoc.train`` that touch the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from segvoc.engine.callbacks import nonfinite_error
from segvoc.engine.checkpoint import load_state, read_checkpoint
from segvoc.engine.interrupts import PreemptionCheckpoint, RequeueRequested, signal_name
from segvoc.errors import InterruptedRun


def _callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def fit(trainer: pl.Trainer, task: pl.LightningModule, datamodule: pl.LightningDataModule,
        ckpt_path: str | None, run_dir: Path) -> None:
    """``trainer.fit``, continuing from ``ckpt_path`` (checked against the task first). A stop request (SIGTERM,
    Ctrl-C, SIGUSR1/SIGUSR2, submitit's requeue) becomes ``InterruptedRun`` saying how to resume; after a NaN loss
    it is the ``NonFiniteLossError`` naming the step (the last good ``last.ckpt`` was kept)."""
    if ckpt_path:
        ckpt = read_checkpoint(ckpt_path, what="ckpt_path")
        load_state(task, ckpt["state_dict"], ckpt_path, OmegaConf.create(ckpt["hyper_parameters"]["cfg"]),
                   check_only=True)  # the stored config only names the model in an error: nothing is built
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as exc:  # Lightning ends a fit with SystemExit on SIGTERM (SIGTERMException) and Ctrl-C
        preempt = _callback(trainer, PreemptionCheckpoint)
        if preempt is None or not preempt.interrupted:
            raise
        if preempt.nonfinite_step is not None:
            raise nonfinite_error(preempt.nonfinite_step) from None
        if isinstance(exc, RequeueRequested) and trainer.is_global_zero:
            preempt.requeue()  # submitit requeues this job and exits; the requeued job resumes (resume=auto)
        raise InterruptedRun(f"{run_dir}: stopped by {signal_name(exc, preempt)} at step {trainer.global_step}; "
                             f"resume with: python -m segvoc.train resume={run_dir}") from None


def score_best_checkpoint(trainer: pl.Trainer, task: pl.LightningModule,
                          datamodule: pl.LightningDataModule) -> None:
    """Validate, then test, the fit's best checkpoint (the first ``ModelCheckpoint``'s, else the current weights)
    with the fit's own Trainer: full-resolution images, every image once, bootstrap intervals; the scores land in
    ``task.scores`` and the ``RunArtifacts`` callback writes them. Outside a fit no callback saves a checkpoint or
    stops early, and the task logs no point to the training curves."""
    checkpoint = trainer.checkpoint_callback
    best = (checkpoint.best_model_path if checkpoint is not None else "") or None
    for run in (trainer.validate, trainer.test):
        run(task, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
