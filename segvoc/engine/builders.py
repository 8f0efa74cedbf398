"""The one place a composed run config becomes objects: model, DataModule, task (model + loss + optimiser +
scheduler), Trainer (callbacks, loggers, plug-ins from ``conf/trainer`` and ``conf/callbacks``). Entry points call
these; nothing else builds from config."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from torch import nn

from segvoc.data.datamodule import SegmentationDataModule
from segvoc.data.layouts import dataset_classes
from segvoc.data.statistics import cached_class_statistics
from segvoc.engine.checkpoint import checkpoint_config, load_state, read_checkpoint
from segvoc.engine.feature_cache import FeatureCache
from segvoc.engine.interrupts import PreemptionCheckpoint
from segvoc.engine.perf import prepare_model
from segvoc.engine.task import SegmentationTask
from segvoc.errors import ConfigError, SegvocError
from segvoc.evaluation.inference import InferenceConfig
from segvoc.losses.segmentation import SegmentationLoss
from segvoc.losses.weighting import class_weights
from segvoc.utils import write_json

log = logging.getLogger("segvoc")

# model-node keys that configure segvoc around the network rather than the network's constructor
_NOT_CONSTRUCTOR_KEYS = ("name", "cache_features")
# defaults for nodes stored by segvoc 0.4 and earlier, which had no _target_ there
DEFAULT_TARGETS = {"data": "segvoc.data.datamodule.SegmentationDataModule", "trainer": "pytorch_lightning.Trainer"}


def build(node: Mapping, key: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; a key the target does not take is a ``ConfigError`` naming ``<key>.<arg>``
    and the keys it does take (instead of Hydra's multi-line traceback)."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    params.setdefault("_target_", DEFAULT_TARGETS.get(key))
    try:
        return instantiate(params, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, SegvocError):  # the object's own one-line refusal, as it raised it
            raise cause from None
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if bad is None:
            raise
        raise ConfigError(f"{key}.{bad.group(1)}: {params['_target_']} takes no such argument; remove it or check "
                          "its spelling") from None


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Instantiate a ``conf/model/*.yaml`` node (``_target_``) with ``num_classes`` outputs.

    ``pretrained=False`` skips downloading/reading backbone weights (used when a checkpoint will overwrite them).
    """
    overrides: dict = {"num_classes": num_classes}
    if not pretrained:
        overrides |= {key: "none" for key in ("weights", "encoder_weights") if key in cfg}
    params = {k: v for k, v in cfg.items() if k not in _NOT_CONSTRUCTOR_KEYS}
    return build(OmegaConf.create(params), "model", **overrides, _convert_="all")


def build_datamodule(cfg: DictConfig, split_dir: str | Path | None = None) -> SegmentationDataModule:
    """The DataModule of ``conf/data`` (its ``_target_``) with the run's augmentation, seed and cache folder."""
    accelerator = (cfg.get("trainer") or {}).get("accelerator")
    return build(cfg.data, "data", _recursive_=False, augment=OmegaConf.to_container(cfg.augment, resolve=True),
                 split_dir=str(split_dir) if split_dir else None, seed=int(cfg.get("seed", 0)),
                 cache_dir=str(cfg.paths.cache_dir), accelerator=accelerator)


@dataclass
class ClassWeights:
    """The loss's class weights and where they came from (written to the run's ``class_weights.json``)."""

    scheme: str
    weights: list[float]
    counts: list[int]


def class_weights_for(cfg: DictConfig, dm: SegmentationDataModule, prepare: bool = False,
                      record: Path | None = None) -> ClassWeights | None:
    """``loss.class_weights`` computed from the training masks (counted once, cached), or None for no weighting.
    ``prepare``: get the data (``dm.prepare_data``) and set up ``dm`` first, only when weights are needed;
    ``record``: a run directory to write them to (``class_weights.json``; rank 0 only)."""
    scheme = str(cfg.loss.get("class_weights") or "none")
    scale = float(cfg.loss.get("background_scale", 1.0))
    if scheme == "none" and scale == 1.0:
        return None
    if prepare:
        dm.prepare_data()
        dm.setup("fit")
    stats = cached_class_statistics(dm.datasets["train"].mask_paths(), Path(cfg.paths.cache_dir), dm.classes)
    weights = class_weights(scheme, stats, scale)
    assert weights is not None
    log.info("class weights (%s): %s", scheme, " ".join(f"{w:.3g}" for w in weights))
    result = ClassWeights(scheme, weights.tolist(), stats.counts.tolist())
    if record is not None and pl.utilities.rank_zero_only.rank == 0:
        write_json(Path(record) / "class_weights.json", asdict(result))
    return result


# loss-node keys that configure the weighting rather than the loss's constructor
_NOT_LOSS_KEYS = ("name", "class_weights", "background_scale")


def build_loss(cfg: DictConfig, weights: Sequence[float] | None = None) -> SegmentationLoss:
    """The ``conf/loss`` node's loss with ``weights`` (None: unweighted, or weights to come from a checkpoint)."""
    loss_cfg = cfg.loss
    weighted = not (str(loss_cfg.get("class_weights") or "none") == "none"
                    and float(loss_cfg.get("background_scale", 1.0)) == 1.0)
    params = {k: v for k, v in loss_cfg.items() if k not in _NOT_LOSS_KEYS}
    params.setdefault("_target_", "segvoc.losses.segmentation.CrossEntropy")  # checkpoints of segvoc 0.1
    return build(OmegaConf.create(params), "loss", num_classes=dataset_classes(cfg.data).num_classes, weight=weights,
                 weighted=weighted, _convert_="all")


def build_task(cfg: DictConfig, class_weights: ClassWeights | None = None,
               pretrained: bool = True) -> SegmentationTask:
    """Model, loss and task from a composed run config (``conf/train.yaml``); the classes are the dataset's
    (``segvoc.data.layouts.dataset_classes``)."""
    classes = dataset_classes(cfg.data)
    num_classes = classes.num_classes
    model = prepare_model(build_model(cfg.model, num_classes, pretrained=pretrained), cfg.get("perf"))
    return SegmentationTask(
        model=model,
        criterion=build_loss(cfg, class_weights.weights if class_weights is not None else None),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        num_classes=num_classes,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        class_names=classes.names,
        colors=classes.colors,
        inference=InferenceConfig(**cfg.infer) if cfg.get("infer") else None,
        seed=int(cfg.get("seed", 0)),
        channels_last=bool((cfg.get("perf") or {}).get("channels_last", False)),
        feature_cache=FeatureCache.for_config(cfg, model),
        cfg=OmegaConf.to_container(cfg, resolve=True),
        boundary_dilation_ratio=float(OmegaConf.select(cfg, "metrics.boundary_dilation_ratio", default=0.02)),
        stats=OmegaConf.to_container(cfg.stats, resolve=True) if cfg.get("stats") else None,
    )


def load_task(path: str | Path, inference: InferenceConfig | None = None,
              trusted: Sequence[str] = ()) -> tuple[SegmentationTask, DictConfig]:
    """Rebuild the task of a checkpoint, in eval mode (no pretrained download: the checkpoint holds every weight).
    The stored config is checked against the allowlist first (``segvoc.safety.trust``; ``trusted``: prefixes typed
    in ``trusted_targets``). For a checkpoint or an exported file alike: ``segvoc.deploy.exported.load_any_task``."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path, trusted)
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
    """The ``conf/trainer`` node's Trainer with the ``conf/callbacks`` callbacks and the ``conf/logger`` loggers.

    ``evaluation=True``: no callbacks and no loggers (``segvoc.evaluate``). ``purge_step``: the loggers drop what
    an earlier launch logged from that step on (a resumed run logs it again). ``logger_kwargs``: per logger key,
    arguments added to its config (``segvoc.runs.trackers.logger_kwargs``: the tracker run to continue, tags).
    """
    if evaluation:
        return build(cfg.trainer, "trainer", callbacks=[], logger=False, enable_model_summary=False,
                     enable_checkpointing=False, benchmark=False)  # mixed sizes: no cuDNN autotuning
    loggers = []
    for key, lg in logger_nodes(cfg).items():
        node = OmegaConf.to_container(lg, resolve=True)
        node |= (logger_kwargs or {}).get(key) or {}  # (W&B takes a `config` argument: not instantiate's kwargs)
        if purge_step and node["_target_"].endswith(("TensorBoardLogger", "ResumableCSVLogger")):
            node["purge_step"] = purge_step
        loggers.append(build(node, f"logger.{key}", _convert_="all"))
    callbacks = [build(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c]
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning refuses to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # the stop check runs after every other callback (one added on the command line too), so that a stop asked for
    # during a batch's hooks is taken at that batch's boundary; Lightning then moves the checkpoint callbacks last
    callbacks.sort(key=lambda c: isinstance(c, PreemptionCheckpoint))
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
