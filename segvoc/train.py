"""``python -m segvoc.train [overrides]``: fit, then validate and test the best checkpoint.

Writes into the Hydra run directory: ``.hydra/``, ``checkpoints/{best,last}.ckpt``, ``tb/`` (TensorBoard),
``splits/`` (the ids used) and ``metrics.json`` = ``{"val": {...}, "test": {...}}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from segvoc import config as _config  # noqa: F401  (registers resolvers before Hydra composes)
from segvoc.cli import run_app
from segvoc.data.datamodule import VOCDataModule, build_datamodule
from segvoc.losses import cached_class_counts, inverse_frequency_weights
from segvoc.task import SegmentationTask
from segvoc.utils import write_json

log = logging.getLogger("segvoc.train")

METRIC_KEYS = ("loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou")


def class_weights_for(cfg: DictConfig, dm: VOCDataModule) -> list[float] | None:
    """Inverse-frequency weights over the training masks when ``loss.class_weights`` asks for them."""
    if cfg.loss.class_weights in (None, "none"):
        return None
    if cfg.loss.class_weights != "inverse_frequency":
        from segvoc.errors import ConfigError

        raise ConfigError(f"loss.class_weights={cfg.loss.class_weights!r}: use none or inverse_frequency")
    ds = dm.datasets["train"]
    paths = [ds.voc / ds.mask_dir / f"{i}.png" for i in ds.ids]
    counts = cached_class_counts(paths, Path(cfg.paths.cache_dir), int(cfg.data.num_classes))
    weights = inverse_frequency_weights(counts, float(cfg.loss.background_scale))
    log.info("class weights: %s", " ".join(f"{w:.3g}" for w in weights))
    return weights.tolist()


def build_trainer(cfg: DictConfig, evaluation: bool = False) -> pl.Trainer:
    """``pl.Trainer`` from ``cfg.trainer`` with the configured callbacks and loggers.

    ``evaluation=True``: no callbacks and no loggers (final scoring must not add points to the training curves).
    """
    kwargs = dict(cfg.trainer)
    if evaluation:
        kwargs["enable_model_summary"] = False
        return pl.Trainer(callbacks=[], logger=False, **kwargs)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg]
    return pl.Trainer(callbacks=callbacks, logger=loggers or False, **kwargs)


def split_scores(task: SegmentationTask, split: str, epoch: int | None) -> dict[str, Any]:
    """The ``metrics.json`` entry of one split."""
    scores = task.scores[split]
    return {**{k: scores[k] for k in METRIC_KEYS}, "epoch": epoch}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then validate and test the best checkpoint; returns (and writes) the metrics dict."""
    out = Path(cfg.paths.output_dir)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    dm = build_datamodule(cfg, split_dir=out / "splits")
    dm.prepare_data()
    dm.setup("fit")
    task = SegmentationTask.from_config(cfg, class_weights=class_weights_for(cfg, dm))
    trainer = build_trainer(cfg)
    trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    ckpt_cb = trainer.checkpoint_callback
    best = (ckpt_cb.best_model_path if ckpt_cb is not None else "") or None
    epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) if best else trainer.current_epoch
    metrics: dict[str, Any] = {}
    scorer = build_trainer(cfg, evaluation=True)
    for split in ("val", "test"):
        run = scorer.validate if split == "val" else scorer.test
        run(task, datamodule=dm, ckpt_path=best, verbose=False)
        metrics[split] = split_scores(task, split, epoch)
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        write_json(out / "confusion.json", {s: task.scores[s]["confusion"].tolist() for s in ("val", "test")})
        for lg in trainer.loggers:
            lg.log_metrics({"hp/val_miou": metrics["val"]["miou"], "hp/test_miou": metrics["test"]["miou"]},
                           step=trainer.global_step)
            lg.finalize("success")
        log.info("val mIoU %.4f pixel acc %.4f | test mIoU %.4f pixel acc %.4f | %s",
                 metrics["val"]["miou"], metrics["val"]["pixel_acc"], metrics["test"]["miou"],
                 metrics["test"]["pixel_acc"], out)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    metrics = run_app(train, cfg)
    key = cfg.get("optimized_metric")
    return metrics["val"][key] if key else None


if __name__ == "__main__":
    main()
