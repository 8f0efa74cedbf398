"""``SegmentationTask``: the one LightningModule that trains, validates and tests every model.

It holds the model, the loss, the metrics, the steps and the optimizers, in torchgeo's ``configure_*`` shape;
everything around them is a callback listed in ``conf/callbacks/`` (non-finite check, figures, run artifacts,
pre-emption, cuDNN autotuning: ``segvoc.engine.callbacks``, ``segvoc.runs.artifacts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MeanMetric

from segvoc.data.palette import ClassSet
from segvoc.data.sampling import epoch_position, mix_seed
from segvoc.data.transforms import Normalize
from segvoc.engine.feature_cache import FeatureCache
from segvoc.errors import ConfigError
from segvoc.evaluation.boundary import BoundaryIoU, boundary_scores_from_counts
from segvoc.evaluation.calibration import Calibration, calibration_scores
from segvoc.evaluation.inference import InferenceConfig, infer
from segvoc.evaluation.metrics import ConfusionMatrix, scores_from_confusion
from segvoc.evaluation.per_image import PerImageRows, per_image_confusion
from segvoc.evaluation.statistics import interval_fields
from segvoc.safety.trust import SIGNATURE_KEY, sign

EVAL_SPLITS = ("val", "test")
LOGGED = ("loss", "miou", "pixel_acc", "mean_class_acc", "boundary_miou", "ece")


def seed_generators(seed: int) -> None:
    """Seed the CPU generator and, once CUDA is in use, the CUDA generators. ``torch.manual_seed`` would do the
    same but, while CUDA is not initialised (any CPU run), records a traceback of the whole call stack for a lazy
    CUDA seeding on every call: about 1 ms per training step inside Lightning (``segvoc.bench``, overhead.null)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class SegmentationTask(pl.LightningModule):
    """Wraps any segmentation ``nn.Module``: loss, optimiser/scheduler from config, dataset-level metrics.

    Batches hold uint8 images; normalisation runs on the device. After each val/test epoch the scores of the whole
    split are in ``self.scores[split]`` (``segvoc.evaluation.metrics.scores_from_confusion``, plus the per-image
    rows; outside a fit also the bootstrap intervals of ``stats``). Built from a run config by
    ``segvoc.engine.builders.build_task``.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: Mapping, scheduler: Mapping | None = None,
                 num_classes: int = 21, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), class_names: Sequence[str] | None = None,
                 inference: InferenceConfig | None = None, seed: int = 0, channels_last: bool = False,
                 feature_cache: FeatureCache | None = None, cfg: dict | None = None,
                 boundary_dilation_ratio: float = 0.02, stats: Mapping | None = None,
                 colors: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        # the run config travels in every checkpoint, signed for this user (segvoc.safety.trust)
        self.save_hyperparameters({"cfg": cfg, SIGNATURE_KEY: sign(cfg)} if cfg is not None else {})
        self.model, self.criterion, self.feature_cache = model, criterion, feature_cache
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        # the dataset's colours (one per class; None: VOC's palette), for figures and predict's masks
        self.palette = ClassSet(tuple(self.class_names), tuple(map(tuple, colors)) if colors else None).palette
        self.normalize = Normalize(mean, std, channels_last=channels_last)
        self.infer_cfg = inference or InferenceConfig.defaults()
        self.seed, self.stats = seed, dict(stats or {})
        self.scores: dict[str, dict[str, Any]] = {}
        self.loaded_epoch: int | None = None  # the epoch of the checkpoint last loaded (the one scored)
        self.configure_metrics(boundary_dilation_ratio)

    def configure_metrics(self, boundary_dilation_ratio: float = 0.02) -> None:
        """Per evaluation split: the confusion matrix, the mean loss, Boundary IoU, calibration and per-image rows."""
        self.confusion = nn.ModuleDict({s: ConfusionMatrix(self.num_classes) for s in EVAL_SPLITS})
        # nan_strategy="disable": the NaN check is a host sync per batch; a NaN loss shows as a NaN mean instead
        self.mean_loss = nn.ModuleDict({s: MeanMetric(nan_strategy="disable") for s in EVAL_SPLITS})
        self.boundary = nn.ModuleDict({s: BoundaryIoU(self.num_classes, boundary_dilation_ratio)
                                       for s in EVAL_SPLITS})
        self.calibration = nn.ModuleDict({s: Calibration() for s in EVAL_SPLITS})
        self.per_image = {s: PerImageRows() for s in EVAL_SPLITS}

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model output for uint8 images (N,3,H,W): logits (N,C,H,W), or ``{"out", "aux"}`` for aux heads."""
        return self.model(self.normalize(images))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out

    def predict_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities (N,C,H,W) for uint8 images under ``self.infer_cfg`` (``evaluation.inference``);
        whatever the TTA, the loss takes them as logits and their argmax is the prediction. Runs eager even when
        ``perf.compile`` compiled the model: full-resolution images come in many sizes (each would recompile)."""
        with torch.compiler.set_stance("force_eager"):
            return infer(self._logits, self.normalize(images), self.infer_cfg)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # dropout & co. draw from a generator seeded by (seed, epoch, batch of the epoch, rank): every micro-batch of
        # an accumulation window and every DDP rank draws its own masks, and a resumed run replays them exactly
        seed_generators(mix_seed(self.seed, self.current_epoch, epoch_position(self.trainer)[0], self.global_rank))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "augment" in batch:  # data.device_augment's plans run in the datamodule's on_after_batch_transfer
            raise ConfigError("data.device_augment=true: the batches were not augmented; pass the datamodule to "
                              "Trainer.fit (datamodule=...) rather than its loaders")
        if self.feature_cache is not None:  # model.cache_features: a frozen encoder's features, computed once
            logits = self.feature_cache.logits(self.normalize(batch["image"]), batch["id"], batch.get("size"))
        else:
            logits = self(batch["image"])
        loss = self.criterion(logits, batch["mask"])
        # not prog_bar: Lightning would turn it into a float (a host sync) at every step (engine.progress)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch: dict, split: str) -> torch.Tensor:
        """Scores one batch; returns its predictions (callbacks draw figures from them)."""
        log_probs = self.predict_log_probs(batch["image"])
        masks = batch["mask"]
        loss = self.criterion(log_probs, masks)
        self.mean_loss[split].update(loss, weight=torch.full_like(loss, len(masks)))  # a tensor: no host copy
        preds = log_probs.argmax(1)
        self.confusion[split].update(preds, masks)
        # per-image rows for intervals and paired comparisons; all stay on the device until the split ends
        boundary = self.boundary[split].per_image(preds, masks)
        calibration = self.calibration[split].per_image(log_probs, masks)
        self.boundary[split].update(boundary)
        self.calibration[split].update(calibration)
        self.per_image[split].add(batch["id"], confusion=per_image_confusion(preds, masks, self.num_classes),
                                  boundary=boundary, calibration=calibration)
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def _end_epoch(self, split: str) -> None:
        """The split's scores, gathered from every rank, into ``self.scores[split]``; logged while fitting."""
        matrix = self.confusion[split].compute()
        scores = scores_from_confusion(matrix)
        scores["loss"] = float(self.mean_loss[split].compute())
        scores["confusion"] = matrix.cpu().numpy()
        scores.update(boundary_scores_from_counts(self.boundary[split].compute()))
        scores.update(calibration_scores(self.calibration[split].compute()))
        datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", None) or {}
        order = list(datasets[split].ids) if split in datasets else None  # the split list's order
        scores["ids"], scores["per_image"] = self.per_image[split].gather(order)
        for metric in (self.confusion[split], self.mean_loss[split], self.boundary[split], self.calibration[split],
                       self.per_image[split]):
            metric.reset()
        fitting = self.trainer.state.fn == "fit"
        if not fitting:  # a final scoring (or segvoc.evaluate): the bootstrap intervals over its images
            scores.update(interval_fields(scores["per_image"], self.stats, scores))
        self.scores[split] = scores
        if fitting:  # final scoring adds no point to the training curves
            sync = self.trainer.world_size > 1  # the scores are already global; sync_dist only averages equal values
            for key in LOGGED:
                self.log(f"{split}/{key}", scores[key], prog_bar=key == "miou", sync_dist=sync)
            for name, iou in zip(self.class_names, scores["per_class_iou"], strict=False):
                if iou is not None:
                    self.log(f"{split}_iou/{name}", iou, sync_dist=sync)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_epoch = checkpoint.get("epoch")

    def _param_groups(self) -> list[dict]:
        """The model's trainable parameters; a model with ``param_groups()`` (e.g. an auxiliary head at 10x the
        learning rate) gets its groups, each ``lr_scale`` turned into an ``lr`` relative to ``optimizer.lr``."""
        if not hasattr(self.model, "param_groups"):
            return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        base_lr = float(self.optimizer_cfg["lr"])
        groups = []
        for g in self.model.param_groups():
            g = dict(g)
            scale = g.pop("lr_scale", None)
            groups.append({**g, "lr": base_lr * scale} if scale is not None else g)
        return groups

    def configure_optimizers(self) -> dict:
        optimizer = instantiate(self.optimizer_cfg, _partial_=True)(params=self._param_groups())
        sched = self.scheduler_cfg
        if not sched or not sched.get("scheduler"):
            return {"optimizer": optimizer}
        kwargs = {}
        if "total_iters" in sched["scheduler"] and sched["scheduler"]["total_iters"] is None:
            kwargs["total_iters"] = int(self.trainer.estimated_stepping_batches)
        scheduler = instantiate(sched["scheduler"], optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": sched.get("interval", "epoch")}}
