"""The one place a composed run config becomes objects: model, DataModule, task (model + loss + optimiser +
scheduler), Trainer (callbacks, loggers, plug-ins). Entry points call these; nothing else builds from config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from torch import nn

from segvoc.data.datamodule import VOCDataModule
from segvoc.data.palette import VOC_CLASSES
from segvoc.data.statistics import cached_class_statistics
from segvoc.engine.checkpoint import AtomicCheckpointIO, checkpoint_config, load_state, read_checkpoint
from segvoc.engine.feature_cache import FeatureCache
from segvoc.engine.interrupts import PreemptionCheckpoint
from segvoc.engine.perf import CudnnBenchmark, prepare_model
from segvoc.engine.progress import progress_bar
from segvoc.engine.task import SegmentationTask
from segvoc.evaluation.inference import InferenceConfig
from segvoc.losses.segmentation import SegmentationLoss
from segvoc.losses.weighting import class_weights

log = logging.getLogger("segvoc")

# model-node keys that configure segvoc around the network rather than the network's constructor
_NOT_CONSTRUCTOR_KEYS = ("name", "cache_features")


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Instantiate a ``conf/model/*.yaml`` node (``_target_``) with ``num_classes`` outputs.

    ``pretrained=False`` skips downloading/reading backbone weights (used when a checkpoint will overwrite them).
    """
    overrides: dict = {"num_classes": num_classes}
    if not pretrained:
        overrides |= {key: "none" for key in ("weights", "encoder_weights") if key in cfg}
    params = {k: v for k, v in cfg.items() if k not in _NOT_CONSTRUCTOR_KEYS}
    return instantiate(params, **overrides, _convert_="all")


def resolve_loader_settings(num_workers: int | str, pin_memory: bool | str,
                            accelerator: str | None = None) -> tuple[int, bool]:
    """``auto`` workers = the CPUs this process may use, up to 8; ``auto`` pinning = when training on a GPU."""
    if num_workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(8, cpus)
    if pin_memory == "auto":
        pin_memory = accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available()
    return int(num_workers), bool(pin_memory)


def resolve_eval_batch_size(eval_batch_size: int | str, batch_size: int, accelerator: str | None = None) -> int:
    """``auto``: 1 on the CPU, where batching full-resolution images measured no faster (``segvoc.bench``), and the
    training batch size on a GPU. Batches only ever hold images of one size, so the value never changes scores."""
    if eval_batch_size == "auto":
        gpu = accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available()
        return int(batch_size) if gpu else 1
    return int(eval_batch_size)


def build_datamodule(cfg: DictConfig, split_dir: str | Path | None = None) -> VOCDataModule:
    """The DataModule for a composed run config (``cfg.data`` + ``cfg.augment``)."""
    d = cfg.data
    trainer_cfg = cfg.get("trainer") or {}
    workers, pin = resolve_loader_settings(d.num_workers, d.pin_memory, trainer_cfg.get("accelerator"))
    return VOCDataModule(
        root=d.root, train_split=d.train_split, test_fraction=d.test_fraction, split_seed=d.split_seed,
        subset=d.subset, batch_size=d.batch_size, num_workers=workers,
        eval_batch_size=resolve_eval_batch_size(d.eval_batch_size, d.batch_size, trainer_cfg.get("accelerator")),
        pin_memory=pin, download=d.download, sources={"urls": d.get("urls") or {}, "md5": d.get("md5") or {}},
        augment=cfg.augment, synthetic_cfg=d.get("synthetic"),
        split_dir=str(split_dir) if split_dir else None, seed=int(cfg.get("seed", 0)),
        decode_cache=bool(d.get("decode_cache", False)), cache_dir=str(cfg.paths.cache_dir),
        device_augment=bool(d.get("device_augment", False)),
    )


@dataclass
class ClassWeights:
    """The loss's class weights and where they came from (written to the run's ``class_weights.json``)."""

    scheme: str
    weights: list[float]
    counts: list[int]


def class_weights_for(cfg: DictConfig, dm: VOCDataModule, prepare: bool = False) -> ClassWeights | None:
    """``loss.class_weights`` computed from the training masks (counted once, cached), or None for no weighting.
    ``prepare``: get the data (``dm.prepare_data``) and set up ``dm`` first, only when weights are needed."""
    scheme = str(cfg.loss.get("class_weights") or "none")
    scale = float(cfg.loss.get("background_scale", 1.0))
    if scheme == "none" and scale == 1.0:
        return None
    if prepare:
        dm.prepare_data()
        dm.setup("fit")
    stats = cached_class_statistics(dm.datasets["train"].mask_paths(), Path(cfg.paths.cache_dir),
                                    int(cfg.data.num_classes))
    weights = class_weights(scheme, stats, scale)
    assert weights is not None
    log.info("class weights (%s): %s", scheme, " ".join(f"{w:.3g}" for w in weights))
    return ClassWeights(scheme, weights.tolist(), stats.counts.tolist())


# loss-node keys that configure the weighting rather than the loss's constructor
_NOT_LOSS_KEYS = ("name", "class_weights", "background_scale")


def build_loss(cfg: DictConfig, weights: Sequence[float] | None = None) -> SegmentationLoss:
    """The ``conf/loss`` node's loss with ``weights`` (None: unweighted, or weights to come from a checkpoint)."""
    loss_cfg = cfg.loss
    weighted = not (str(loss_cfg.get("class_weights") or "none") == "none"
                    and float(loss_cfg.get("background_scale", 1.0)) == 1.0)
    params = {k: v for k, v in loss_cfg.items() if k not in _NOT_LOSS_KEYS}
    params.setdefault("_target_", "segvoc.losses.segmentation.CrossEntropy")  # checkpoints of segvoc 0.1
    return instantiate(params, num_classes=int(cfg.data.num_classes), weight=weights, weighted=weighted,
                       _convert_="all")


def build_task(cfg: DictConfig, class_weights: ClassWeights | None = None,
               pretrained: bool = True) -> SegmentationTask:
    """Model, loss and task from a composed run config (``conf/train.yaml``)."""
    num_classes = int(cfg.data.num_classes)
    model = prepare_model(build_model(cfg.model, num_classes, pretrained=pretrained), cfg.get("perf"))
    return SegmentationTask(
        model=model,
        criterion=build_loss(cfg, class_weights.weights if class_weights is not None else None),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        num_classes=num_classes,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        class_names=VOC_CLASSES[:num_classes],
        log_images=int(cfg.get("log_images", 4)),
        inference=InferenceConfig(**cfg.infer) if cfg.get("infer") else None,
        seed=int(cfg.get("seed", 0)),
        channels_last=bool((cfg.get("perf") or {}).get("channels_last", False)),
        feature_cache=FeatureCache.for_config(cfg, model),
        cfg=OmegaConf.to_container(cfg, resolve=True),
        boundary_dilation_ratio=float(OmegaConf.select(cfg, "metrics.boundary_dilation_ratio", default=0.02)),
    )


def load_task(path: str | Path, inference: InferenceConfig | None = None) -> tuple[SegmentationTask, DictConfig]:
    """Rebuild the task of a checkpoint, in eval mode (no pretrained download: the checkpoint holds every weight).
    For a checkpoint or an exported file alike, see ``segvoc.deploy.exported.load_any_task``."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    task = build_task(cfg, pretrained=False)
    load_state(task, ckpt["state_dict"], path, cfg)
    if inference is not None:
        task.infer_cfg = inference
    task.eval()
    return task, cfg


def logger_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configured loggers, by key (``tensorboard``, ``csv``, ``mlflow``, ``wandb``): the ``logger`` node's
    entries that have a ``_target_`` (its other keys, such as ``log_checkpoints``, are settings)."""
    node = cfg.get("logger") or {}
    return {k: v for k, v in node.items() if isinstance(v, DictConfig) and v.get("_target_")}


def build_trainer(cfg: DictConfig, evaluation: bool = False, purge_step: int | None = None,
                  logger_kwargs: dict[str, dict] | None = None) -> pl.Trainer:
    """``pl.Trainer`` from ``cfg.trainer`` with the configured callbacks and loggers, atomic checkpoint writes and
    exact-resume handling of SIGTERM/Ctrl-C.

    ``evaluation=True``: no callbacks and no loggers (final scoring must not add points to the training curves).
    ``purge_step``: TensorBoard drops events at or after this step (a resumed run re-logs them).
    ``logger_kwargs``: per logger key, arguments added to its config (``segvoc.runs.trackers.logger_kwargs``: the
    tracker run to continue, tags, names).
    """
    kwargs = dict(cfg.trainer)
    if evaluation:
        kwargs.update(enable_model_summary=False, enable_checkpointing=False, benchmark=False)  # mixed sizes
        return pl.Trainer(callbacks=[], logger=False, **kwargs)
    out = Path(cfg.paths.output_dir)
    loggers = []
    for key, lg in logger_nodes(cfg).items():
        node = OmegaConf.to_container(lg, resolve=True)
        node |= (logger_kwargs or {}).get(key) or {}  # (W&B takes a `config` argument: not instantiate's kwargs)
        if purge_step and "TensorBoard" in node["_target_"]:
            node["purge_step"] = purge_step
        loggers.append(instantiate(node, _convert_="all"))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning refuses to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(PreemptionCheckpoint(out / "checkpoints", out))
    if kwargs.get("enable_progress_bar", True):
        callbacks.append(progress_bar())
    callbacks.append(CudnnBenchmark(bool((cfg.get("perf") or {}).get("cudnn_benchmark", False))))
    return pl.Trainer(callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                      default_root_dir=str(out), **kwargs)
