"""``SegmentationTask``: the one LightningModule that trains, validates and tests every model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from segvoc.data.palette import VOC_CLASSES
from segvoc.data.sampling import epoch_position, mix_seed
from segvoc.data.transforms import Normalize
from segvoc.engine.feature_cache import FeatureCache
from segvoc.errors import ConfigError, NonFiniteLossError
from segvoc.evaluation.boundary import BoundaryIoU, boundary_scores_from_counts
from segvoc.evaluation.calibration import Calibration, calibration_scores
from segvoc.evaluation.inference import InferenceConfig, infer
from segvoc.evaluation.metrics import ConfusionMatrix, scores_from_confusion
from segvoc.evaluation.per_image import PerImageRows, per_image_confusion

EVAL_SPLITS = ("val", "test")


def seed_generators(seed: int) -> None:
    """Seed the CPU generator and, once CUDA is in use, the CUDA generators. ``torch.manual_seed`` would do the
    same but, while CUDA is not initialised (any CPU run), records a traceback of the whole call stack for a lazy
    CUDA seeding on every call: about 1 ms per training step inside Lightning (``segvoc.bench``, overhead.null)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class SegmentationTask(pl.LightningModule):
    """Wraps any segmentation ``nn.Module``: loss, optimiser/scheduler from config, dataset-level metrics.

    Batches hold uint8 images; normalisation runs on the device. After each val/test epoch the scores of
    the whole split are in ``self.scores[split]`` (see ``segvoc.evaluation.metrics.scores_from_confusion``).
    Built from a run config by ``segvoc.engine.builders.build_task``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: DictConfig | dict,
        scheduler: DictConfig | dict | None = None,
        num_classes: int = 21,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        class_names: Sequence[str] = VOC_CLASSES,
        log_images: int = 4,
        inference: InferenceConfig | None = None,
        seed: int = 0,
        channels_last: bool = False,
        feature_cache: FeatureCache | None = None,
        cfg: dict | None = None,
        boundary_dilation_ratio: float = 0.02,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": cfg} if cfg is not None else {})
        self.model = model
        self.criterion = criterion
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.log_images = log_images
        self.infer_cfg = inference or InferenceConfig.defaults()
        self.seed = seed
        # the losses since the last finiteness check, on the device (one copy per step, no host sync), and their
        # global steps on the host; sized at the start of fit (trainer.log_every_n_steps). Not a buffer: DDP would
        # broadcast rank 0's over the others' at every forward
        self._recent_losses = torch.zeros(1)
        self._recent_steps: list[int] = []
        self.normalize = Normalize(mean, std, channels_last=channels_last)
        self.confusion = nn.ModuleDict({s: ConfusionMatrix(num_classes) for s in EVAL_SPLITS})
        # nan_strategy="disable": the NaN check is a host sync per batch; a NaN loss shows as a NaN mean instead
        self.mean_loss = nn.ModuleDict({s: MeanMetric(nan_strategy="disable") for s in EVAL_SPLITS})
        self.boundary = nn.ModuleDict({s: BoundaryIoU(num_classes, boundary_dilation_ratio) for s in EVAL_SPLITS})
        self.calibration = nn.ModuleDict({s: Calibration() for s in EVAL_SPLITS})
        self.per_image = {s: PerImageRows() for s in EVAL_SPLITS}
        self.scores: dict[str, dict[str, Any]] = {}
        self._samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.feature_cache = feature_cache

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model output for uint8 images (N,3,H,W): logits (N,C,H,W), or ``{"out", "aux"}`` for aux heads."""
        return self.model(self.normalize(images))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out

    def predict_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities (N,C,H,W) for uint8 images under ``self.infer_cfg`` (``evaluation.inference.infer``):
        whatever the TTA, the loss takes them as logits and their argmax is the prediction.

        Runs eager even when ``perf.compile`` compiled the model: full-resolution images come in many sizes, and
        each new size would recompile until Dynamo's limit, then silently fall back (conf/perf/default.yaml)."""
        with torch.compiler.set_stance("force_eager"):
            return infer(self._logits, self.normalize(images), self.infer_cfg)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # dropout & co. draw from a generator seeded by (seed, epoch, batch of the epoch, rank): every micro-batch of
        # an accumulation window and every DDP rank draws its own masks, and a resumed run replays them exactly
        index = epoch_position(self.trainer)[0]  # batches already trained in this epoch (restored on resume)
        seed_generators(mix_seed(self.seed, self.current_epoch, index, self.global_rank))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "augment" in batch:  # data.device_augment's plans run in VOCDataModule.on_after_batch_transfer
            raise ConfigError("data.device_augment=true: the batches were not augmented; pass the datamodule to "
                              "Trainer.fit (datamodule=...) rather than its loaders")
        if self.feature_cache is not None:
            logits = self.feature_cache.logits(self.normalize(batch["image"]), batch["id"], batch.get("size"))
        else:
            logits = self(batch["image"])
        loss = self.criterion(logits, batch["mask"])
        # not prog_bar: Lightning would turn it into a float (a host sync) at every step; the progress bar
        # (engine.progress) shows it at logging steps only
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        self._remember_loss(loss)
        return loss

    def on_train_start(self) -> None:
        self._recent_losses = torch.zeros(max(1, self.trainer.log_every_n_steps), device=self.device)
        self._recent_steps = []

    def _remember_loss(self, loss: torch.Tensor) -> None:
        """Keep the loss on the device for the next ``check_finite``: one copy (one kernel), no host sync."""
        if len(self._recent_steps) == len(self._recent_losses):  # no check since the buffer filled (rare): check now
            self.check_finite()
        self._recent_losses[len(self._recent_steps)].copy_(loss.detach())
        self._recent_steps.append(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.check_finite()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.check_finite()

    def first_nonfinite_step(self) -> int:
        """The global step of the first NaN/inf loss since the last check, or -1 (one host sync)."""
        count = len(self._recent_steps)
        if count == 0:
            return -1
        bad = (~torch.isfinite(self._recent_losses[:count])).nonzero().flatten().tolist()
        return self._recent_steps[bad[0]] if bad else -1

    def check_finite(self) -> None:
        """Stop with ``NonFiniteLossError`` (naming the step) if a loss since the last check was NaN/inf."""
        step = self.first_nonfinite_step()
        self._recent_steps = []
        if step >= 0:
            raise NonFiniteLossError(
                f"loss became NaN/inf at step {step}; stopped before saving: the last good checkpoint is "
                "checkpoints/last.ckpt. Lower optimizer.lr, check the data, or try trainer.gradient_clip_val=1.0"
            )

    def _eval_step(self, batch: dict, split: str, batch_idx: int) -> None:
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
        if split == "val" and len(self._samples) < self.log_images and not self.trainer.sanity_checking:
            for k in range(min(len(masks), self.log_images - len(self._samples))):
                self._samples.append((batch["image"][k].detach(), masks[k].detach(), preds[k].detach()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def _end_epoch(self, split: str) -> None:
        matrix = self.confusion[split].compute()
        scores = scores_from_confusion(matrix)
        scores["loss"] = float(self.mean_loss[split].compute())
        scores["confusion"] = matrix.cpu().numpy()
        scores.update(boundary_scores_from_counts(self.boundary[split].compute()))
        scores.update(calibration_scores(self.calibration[split].compute()))
        scores["ids"], scores["per_image"] = self.per_image[split].gather(self._split_ids(split))
        for metric in (self.confusion[split], self.mean_loss[split], self.boundary[split], self.calibration[split],
                       self.per_image[split]):
            metric.reset()
        self.scores[split] = scores
        # the scores are already global (the metrics sync across ranks); sync_dist only averages equal values
        sync = self.trainer.world_size > 1
        for key in ("loss", "miou", "pixel_acc", "mean_class_acc", "boundary_miou", "ece"):
            self.log(f"{split}/{key}", scores[key], prog_bar=key == "miou", sync_dist=sync)
        for name, iou in zip(self.class_names, scores["per_class_iou"], strict=False):
            if iou is not None:
                self.log(f"{split}_iou/{name}", iou, sync_dist=sync)
        if split == "val" and not self.trainer.sanity_checking:
            self._log_pictures(scores["confusion"])
        self._samples.clear()

    def _split_ids(self, split: str) -> list[str] | None:
        """The split's ids in the order of its list (``splits/<split>.txt``), when the datamodule has them."""
        datasets = getattr(getattr(self.trainer, "datamodule", None), "datasets", None) or {}
        return list(datasets[split].ids) if split in datasets else None

    def set_boundary_dilation_ratio(self, ratio: float) -> None:
        """``metrics.boundary_dilation_ratio`` for the following evaluations."""
        for metric in self.boundary.values():
            metric.ratio = float(ratio)

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def _log_pictures(self, matrix: np.ndarray) -> None:
        """Image | truth | prediction grid and the confusion matrix, once per val epoch, rank 0 only."""
        tb = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None or self.global_rank != 0:
            return
        from segvoc.evaluation.figures import confusion_figure, prediction_figure

        if self._samples:
            rows = [(img.permute(1, 2, 0).cpu().numpy(), m.cpu().numpy(), p.cpu().numpy().astype(np.uint8))
                    for img, m, p in self._samples]
            tb.experiment.add_figure("val/predictions", prediction_figure(rows, self.run_title(), None,
                                                                          self.class_names), self.current_epoch)
        tb.experiment.add_figure("val/confusion_matrix", confusion_figure(matrix, self.class_names),
                                 self.current_epoch)

    def run_title(self) -> str:
        """The run's label for figures: its name, seed and run directory (from the config it was built with), and
        the epoch."""
        cfg = self.hparams.get("cfg") or {}
        out = (cfg.get("paths") or {}).get("output_dir")
        parts = [str(cfg.get("name") or type(self.model).__name__), f"seed {cfg.get('seed', self.seed)}"]
        return ", ".join(parts) + (f" ({Path(out).name})" if out else "") + f", epoch {self.current_epoch}"

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
