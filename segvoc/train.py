"""``python -m segvoc.train [overrides]``: fit, then validate and test the best checkpoint.

Writes into the Hydra run directory: ``.hydra/``, ``checkpoints/{best,last}.ckpt``, ``tb/`` (TensorBoard),
``splits/`` (the ids used) and ``metrics.json`` = ``{"val": {...}, "test": {...}}``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segvoc.callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from segvoc.checkpoint import checkpoint_config, load_state, read_checkpoint
from segvoc.cli import quiet_library_noise, run_app
from segvoc.config import carry_overrides  # also registers resolvers before Hydra composes
from segvoc.data.datamodule import VOCDataModule, build_datamodule
from segvoc.errors import ConfigError, InterruptedRun
from segvoc.losses import cached_class_counts, inverse_frequency_weights
from segvoc.sweep import record_failure
from segvoc.task import SegmentationTask
from segvoc.utils import write_json

log = logging.getLogger("segvoc.train")

METRIC_KEYS = ("loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou")


def class_weights_for(cfg: DictConfig, dm: VOCDataModule) -> list[float] | None:
    """Inverse-frequency weights over the training masks when ``loss.class_weights`` asks for them."""
    if cfg.loss.class_weights in (None, "none"):
        return None
    if cfg.loss.class_weights != "inverse_frequency":
        raise ConfigError(f"loss.class_weights={cfg.loss.class_weights!r}: use none or inverse_frequency")
    ds = dm.datasets["train"]
    paths = [ds.voc / ds.mask_dir / f"{i}.png" for i in ds.ids]
    counts = cached_class_counts(paths, Path(cfg.paths.cache_dir), int(cfg.data.num_classes))
    weights = inverse_frequency_weights(counts, float(cfg.loss.background_scale))
    log.info("class weights: %s", " ".join(f"{w:.3g}" for w in weights))
    return weights.tolist()


def build_trainer(cfg: DictConfig, evaluation: bool = False, purge_step: int | None = None) -> pl.Trainer:
    """``pl.Trainer`` from ``cfg.trainer`` with the configured callbacks and loggers, atomic checkpoint writes and
    a checkpoint on SIGTERM/SIGINT.

    ``evaluation=True``: no callbacks and no loggers (final scoring must not add points to the training curves).
    ``purge_step``: TensorBoard drops events at or after this step (a resumed run re-logs them).
    """
    kwargs = dict(cfg.trainer)
    if evaluation:
        kwargs["enable_model_summary"] = False
        return pl.Trainer(callbacks=[], logger=False, **kwargs)
    out = Path(cfg.paths.output_dir)
    loggers = []
    for lg in (cfg.get("logger") or {}).values():
        if lg:
            extra = {"purge_step": purge_step} if purge_step and "TensorBoard" in lg.get("_target_", "") else {}
            loggers.append(instantiate(lg, **extra))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning refuses to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(PreemptionCheckpoint(out / "checkpoints", out))
    return pl.Trainer(callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                      default_root_dir=str(out), **kwargs)


# what may change when a run is resumed: where and how it runs, not what it trains
RESUME_MAY_CHANGE = ("trainer", "callbacks", "logger", "perf", "infer", "paths", "data.root", "data.num_workers",
                     "data.pin_memory", "data.download", "traceback", "log_images", "matmul_precision")


def resume_config(cfg: DictConfig) -> DictConfig:
    """The config of the run in ``cfg.resume`` (stored in its last checkpoint), set to continue from it.

    What the user typed with ``resume=`` is applied on top when it only changes where and how the run goes on
    (``trainer=ddp trainer.devices=4``, ``trainer.max_epochs=50``, ``data.root=...``); anything that would change
    what is trained (``model=``, ``loss.*``, ``data.batch_size``, ...) is refused with one line naming the key.
    """
    run_dir = Path(cfg.resume).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume={run_dir}: no checkpoints/last.ckpt there; pass the run directory of a segvoc run")
    run_cfg = carry_overrides(checkpoint_config(read_checkpoint(last)), cfg, RESUME_MAY_CHANGE,
                              "a resumed run keeps what it was trained with; start a new run (without resume=)")
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = str(run_dir)
        run_cfg.ckpt_path = str(last)
        run_cfg.resume = None
    return run_cfg


def ensure_writable(out: Path) -> None:
    """Fail before any training when the run directory cannot be written."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / "checkpoints" / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{out}: run directory is not writable ({exc.strerror}); "
                          "set paths.output_root (or SEGVOC_OUTPUTS) to a writable folder") from None


def split_scores(task: SegmentationTask, split: str, epoch: int | None) -> dict[str, Any]:
    """The ``metrics.json`` entry of one split."""
    scores = task.scores[split]
    return {**{k: scores[k] for k in METRIC_KEYS}, "epoch": epoch}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; returns (and writes) the metrics dict."""
    if cfg.get("resume"):
        cfg = resume_config(cfg)
    out = Path(cfg.paths.output_dir)
    ensure_writable(out)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    if cfg.model.get("cache_features") and cfg.augment.get("train") and cfg.augment.name != "none":
        raise ConfigError(f"model.cache_features=true needs deterministic training inputs, but augment="
                          f"{cfg.augment.name} is random; use augment=none or model.cache_features=false")
    dm = build_datamodule(cfg, split_dir=out / "splits")
    dm.prepare_data()
    dm.setup("fit")
    task = SegmentationTask.from_config(cfg, class_weights=class_weights_for(cfg, dm))
    ckpt_path = cfg.get("ckpt_path")
    purge_step = None
    if ckpt_path and Path(ckpt_path).is_file():
        ckpt = read_checkpoint(ckpt_path)
        load_state(task, ckpt["state_dict"], ckpt_path, checkpoint_config(ckpt), check_only=True)
        purge_step = int(ckpt.get("global_step", 0)) or None
    trainer = build_trainer(cfg, purge_step=purge_step)
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    except SystemExit as exc:  # Lightning ends a fit with SystemExit on SIGTERM (SIGTERMException) and Ctrl-C
        preempt = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        if preempt is None or not preempt.interrupted:
            raise
        signame = "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C"
        raise InterruptedRun(f"{out}: stopped by {signame} at step {trainer.global_step}; "
                             f"resume with: python -m segvoc.train resume={out}") from None

    ckpt_cb = trainer.checkpoint_callback  # the first one: monitors val/miou
    best = (ckpt_cb.best_model_path if ckpt_cb is not None else "") or None
    epoch = trainer.current_epoch
    if best:
        ckpt = read_checkpoint(best)
        task.load_state_dict(ckpt["state_dict"])
        epoch = int(ckpt["epoch"])
    metrics: dict[str, Any] = {}
    scorer = build_trainer(cfg, evaluation=True)
    for split in ("val", "test"):
        run = scorer.validate if split == "val" else scorer.test
        run(task, datamodule=dm, verbose=False)
        metrics[split] = split_scores(task, split, epoch)
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        write_json(out / "confusion.json", {s: task.scores[s]["confusion"].tolist() for s in ("val", "test")})
        final = {"hp/val_miou": metrics["val"]["miou"], "hp/test_miou": metrics["test"]["miou"]}
        for lg in trainer.loggers:
            lg.log_hyperparams(task.hparams.get("cfg", {}), final)  # TensorBoard's HPARAMS tab: config + result
            lg.finalize("success")
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
        try:
            metrics = train(cfg)
        except InterruptedRun as exc:
            print(f"error: {exc}; sweep stopped", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as exc:
            log.error("job failed: %s: %s", type(exc).__name__, exc)
            record_failure(Path(HydraConfig.get().runtime.output_dir), exc)
            return float("nan")
    else:
        metrics = run_app(train, cfg)
    return metrics["val"][key] if key else None


if __name__ == "__main__":
    main()
