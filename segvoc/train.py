"""``python -m segvoc.train [overrides]``: fit, then validate and test the best checkpoint.

Writes into the Hydra run directory: ``.hydra/``, ``checkpoints/{best,last}.ckpt``, ``tb/`` (TensorBoard),
``splits/`` (the ids used), ``metrics.json`` = ``{"val": {...}, "test": {...}}`` and ``MODEL_CARD.md``; with
``logger=mlflow|wandb`` also ``tracker.json`` (the tracker runs, continued on resume; ``segvoc.runs.trackers``).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segvoc.app import quiet_library_noise, run_app
from segvoc.config import check_values, command_line_overrides  # also registers resolvers before Hydra composes
from segvoc.engine.builders import build_datamodule, build_task, build_trainer, class_weights_for
from segvoc.engine.checkpoint import checkpoint_config, load_state, read_checkpoint
from segvoc.engine.interrupts import PreemptionCheckpoint, RequeueRequested
from segvoc.errors import ConfigError, InterruptedRun
from segvoc.runs.directory import (
    auto_resume,
    check_resume_position,
    clear_run,
    ensure_writable,
    holds_run,
    resume_config,
    split_scores,
    write_scores,
)
from segvoc.runs.model_card import FitSummary, device_name, write_model_card
from segvoc.runs.optuna_study import PrunedRun
from segvoc.runs.sweep import clear_failure, record_failure, record_pruned
from segvoc.runs.trackers import check_trackers, finish_trackers, logger_kwargs, record_trackers, tracker_lines
from segvoc.utils import write_json

log = logging.getLogger("segvoc.train")

def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; returns (and writes) the metrics dict."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("overwrite"):
        if cfg.get("resume") not in (None, "auto"):
            raise ConfigError(f"overwrite=true with resume={cfg.resume}: choose one (overwrite starts the run again)")
        clear_run(out)
    elif cfg.get("resume") == "auto":
        decision = auto_resume(cfg, command_line_overrides())
        if decision.action == "finished":
            print(f"skipped, finished: {out} (test mIoU {decision.metrics['test']['miou']:.4f}; overwrite=true "
                  "runs it again)", flush=True)
            return decision.metrics
        cfg = decision.cfg
        if decision.action == "resume":
            log.info("resuming the unfinished run in %s", out)
    elif cfg.get("resume"):
        cfg = resume_config(cfg)
    elif holds_run(out):
        raise ConfigError(f"{out}: holds another run's files (checkpoints or metrics.json); continue it with "
                          f"resume={out} (or resume=auto), replace it with overwrite=true, or pick another "
                          "hydra.run.dir")
    out = Path(cfg.paths.output_dir)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:  # checked before anything is written
        ckpt = read_checkpoint(ckpt_path, what="ckpt_path")
        if "optimizer_states" not in ckpt:
            raise ConfigError(f"ckpt_path={ckpt_path}: holds weights only (no optimizer state), so training cannot "
                              "continue from it; use that run's checkpoints/last.ckpt")
    ensure_writable(out)
    clear_failure(out)  # this job runs again: a FAILED.json of an earlier attempt no longer describes it
    check_trackers(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    dm = build_datamodule(cfg, split_dir=out / "splits")
    # Lightning calls dm.prepare_data() on local rank 0 of each node (then a barrier) inside fit; only the class
    # weights need the training masks before that (every rank counts them; downloads are serialised by a lock)
    weights = class_weights_for(cfg, dm, prepare=True)
    if weights is not None:
        write_json(out / "class_weights.json", asdict(weights))
    task = build_task(cfg, class_weights=weights)
    purge_step = None
    if ckpt_path:
        load_state(task, ckpt["state_dict"], ckpt_path, checkpoint_config(ckpt), check_only=True)
        check_resume_position(cfg, ckpt, ckpt_path)
        purge_step = int(ckpt.get("global_step", 0)) or None
    trainer = build_trainer(cfg, purge_step=purge_step, logger_kwargs=logger_kwargs(cfg, out))
    if trainer.is_global_zero:
        record_trackers(out, trainer.loggers)  # tracker.json: the tracker runs a resumed launch continues
    started = time.perf_counter()
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    except SystemExit as exc:  # Lightning ends a fit with SystemExit on SIGTERM (SIGTERMException) and Ctrl-C
        preempt = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        if preempt is None or not preempt.interrupted:
            raise
        if preempt.nonfinite_step is not None:
            task.check_finite()  # NonFiniteLossError naming the step; the last good last.ckpt was kept
        if isinstance(exc, RequeueRequested) and trainer.is_global_zero:
            preempt.requeue()  # submitit requeues this job and exits; the requeued job resumes (resume=auto)
        signame = ("the requeue signal (SIGUSR2)" if isinstance(exc, RequeueRequested)
                   else "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C")
        raise InterruptedRun(f"{out}: stopped by {signame} at step {trainer.global_step}; "
                             f"resume with: python -m segvoc.train resume={out}") from None

    fit = FitSummary(time.perf_counter() - started, trainer.current_epoch, trainer.global_step, None,
                     resumed=bool(ckpt_path))
    ckpt_cb = trainer.checkpoint_callback  # the first one: monitors val/miou
    best = (ckpt_cb.best_model_path if ckpt_cb is not None else "") or None
    epoch = int(read_checkpoint(best)["epoch"]) if best else trainer.current_epoch
    fit.best_epoch = epoch
    metrics: dict[str, Any] = {}
    scorer = build_trainer(cfg, evaluation=True)
    for split in ("val", "test"):
        run = scorer.validate if split == "val" else scorer.test
        with warnings.catch_warnings():
            # The scorer has no callbacks on purpose (scoring must not add checkpoints or early-stopping state);
            # Lightning warns that the checkpoint's callbacks are missing, which is what is intended here.
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")
            run(task, datamodule=dm, ckpt_path=best, verbose=False)  # Lightning restores the best weights
        metrics[split] = split_scores(task, split, epoch, cfg.get("stats"))
    if trainer.is_global_zero:
        write_scores(out, task, metrics)
        write_model_card(out, cfg, task.model, fit, device_name(task.device), tracking=tracker_lines(out))
        finish_trackers(trainer.loggers, out, cfg, metrics, task.hparams.get("cfg", {}), task.class_names,
                        trainer.global_step, confusion=task.scores["test"]["confusion"])
        log.info("val mIoU %.4f pixel acc %.4f | test mIoU %.4f pixel acc %.4f | %s",
                 metrics["val"]["miou"], metrics["val"]["pixel_acc"], metrics["test"]["miou"],
                 metrics["test"]["pixel_acc"], out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the val ``cfg.optimized_metric`` for sweepers (Optuna).

    In a multirun a failing job is recorded (``FAILED.json``, summarised at the end, exit code 1) and returns
    NaN, so the other jobs go on; an interrupted job (SIGTERM, Ctrl-C) stops the whole sweep. A single run exits
    non-zero on any failure.
    """
    key = cfg.get("optimized_metric")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        quiet_library_noise()
        if cfg.get("resume") is None:  # re-running a sweep in its directory skips finished jobs, resumes the rest
            with open_dict(cfg):
                cfg.resume = "auto"
        try:
            check_values(cfg)  # as run_app does for a single run
            metrics = train(cfg)
        except InterruptedRun as exc:
            print(f"error: {exc}; sweep stopped", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except PrunedRun as exc:  # an Optuna trial its pruner stopped: the sweeper tells the study PRUNED
            log.info("trial pruned: %s", exc)
            record_pruned(Path(HydraConfig.get().runtime.output_dir), exc)
            return float("nan")
        except Exception as exc:
            log.error("job failed: %s: %s", type(exc).__name__, exc)
            record_failure(Path(HydraConfig.get().runtime.output_dir), exc)
            return float("nan")
    else:
        metrics = run_app(train, cfg)
    return metrics["val"][key] if key else None


if __name__ == "__main__":
    from segvoc.extras import exit_if_missing  # hydra/launcher=slurm, hparams_search=optuna: before Hydra composes
    exit_if_missing()
    main()
