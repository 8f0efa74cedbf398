"""Callbacks around the training loop, each listed in ``conf/callbacks/default.yaml`` (an override switches it
off): the non-finite loss check, the TensorBoard figures, and Lightning's checkpoint and early-stopping callbacks
made to survive a resume (rule I of the safety rules)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from segvoc.errors import NonFiniteLossError


class NonFiniteLossCheck(pl.Callback):
    """Stops a fit with ``NonFiniteLossError`` naming the first step whose training loss was NaN/inf.

    Each step copies its loss into a device buffer of ``trainer.log_every_n_steps`` slots (one kernel, no host
    sync); the buffer is read at logging steps, before validation, and when a stop request ends the fit
    (``segvoc.engine.interrupts.PreemptionCheckpoint`` then keeps the last good checkpoint instead of saving NaN
    weights). A buffer that fills before a check is checked before it is reused.
    """

    def __init__(self) -> None:
        self._losses = torch.zeros(1)
        self._steps: list[int] = []
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses = torch.zeros(max(1, trainer.log_every_n_steps), device=pl_module.device)
        self._steps = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            if len(self._steps) == len(self._losses):  # no check since the buffer filled (rare): check now
                self.check()
            self._losses[len(self._steps)].copy_(loss.detach())
            self._steps.append(self._step)
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            self.check()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.check()

    def first_nonfinite_step(self) -> int:
        """The global step of the first NaN/inf loss since the last check, or -1 (one host sync)."""
        count = len(self._steps)
        if count == 0:
            return -1
        bad = (~torch.isfinite(self._losses[:count])).nonzero().flatten().tolist()
        return self._steps[bad[0]] if bad else -1

    def check(self) -> None:
        """``NonFiniteLossError`` (naming the step) if a loss since the last check was NaN/inf."""
        step = self.first_nonfinite_step()
        self._steps = []
        if step >= 0:
            raise nonfinite_error(step)


def nonfinite_error(step: int) -> NonFiniteLossError:
    """The one-line error of a NaN/inf training loss at ``step``."""
    return NonFiniteLossError(
        f"loss became NaN/inf at step {step}; stopped before saving: the last good checkpoint is "
        "checkpoints/last.ckpt. Lower optimizer.lr, check the data, or try trainer.gradient_clip_val=1.0")


class ValidationFigures(pl.Callback):
    """Each validation epoch of a fit, on rank 0, to TensorBoard: the image | truth | prediction | overlay grid of the
    first ``num_images`` validation images and the row-normalised confusion matrix, titled by the run (its name,
    seed, directory) and the epoch, with the dataset's class names."""

    def __init__(self, num_images: int = 4) -> None:
        self.num_images = num_images
        self._samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not isinstance(outputs, torch.Tensor):
            return
        for k in range(min(len(outputs), self.num_images - len(self._samples))):  # on the device: no sync
            self._samples.append((batch["image"][k].detach(), batch["mask"][k].detach(), outputs[k].detach()))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        scores = getattr(pl_module, "scores", {}).get("val")
        if trainer.sanity_checking or trainer.state.fn != "fit" or tb is None or not trainer.is_global_zero:
            return
        from segvoc.evaluation.figures import confusion_figure, prediction_figure

        names = pl_module.class_names
        if self._samples:
            rows = [(img.permute(1, 2, 0).cpu().numpy(), m.cpu().numpy(), p.cpu().numpy().astype(np.uint8))
                    for img, m, p in self._samples]
            figure = prediction_figure(rows, run_title(trainer, pl_module), None, names,
                                       palette=pl_module.palette)
            tb.experiment.add_figure("val/predictions", figure, trainer.current_epoch)
        if scores is not None:
            tb.experiment.add_figure("val/confusion_matrix", confusion_figure(scores["confusion"], names),
                                     trainer.current_epoch)
        self._samples = []


def run_title(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
    """The run's label for figures: its name, seed and run directory (from the config it was built with), and the
    epoch."""
    cfg = pl_module.hparams.get("cfg") or {}
    out = (cfg.get("paths") or {}).get("output_dir")
    parts = [str(cfg.get("name") or type(pl_module.model).__name__), f"seed {cfg.get('seed', '-')}"]
    return ", ".join(parts) + (f" ({Path(out).name})" if out else "") + f", epoch {trainer.current_epoch}"


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps its best-checkpoint tracking when the run directory was moved or copied.

    Lightning drops ``best_model_score`` (and the paths) when the stored ``dirpath`` differs from the callback's, so
    the next epoch would overwrite ``best.ckpt`` even when it is worse. When the best checkpoint moved with the folder
    (it is in the new ``dirpath`` under its old name), the stored paths are moved there and the score is kept; a new
    run started from another run's checkpoint (``ckpt_path=``) has no such file and starts its own tracking."""

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # Lightning's key: checkpoints of either class load into the other

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and str(old) != str(self.dirpath):
            moved = _moved(state_dict, str(old), str(self.dirpath))
            if moved.get("best_model_path") and Path(moved["best_model_path"]).is_file():
                state_dict = {**state_dict, "dirpath": self.dirpath, **moved}
        super().load_state_dict(state_dict)


def _moved(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    def move(path: Any) -> Any:
        return new + path[len(old):] if isinstance(path, str) and path.startswith(old + "/") else path

    out = {k: move(state[k]) for k in ("best_model_path", "kth_best_model_path", "last_model_path") if k in state}
    if "best_k_models" in state:
        out["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return out


class ResumableEarlyStopping(EarlyStopping):
    """``EarlyStopping`` whose decision survives a resume: a checkpoint saved after it decided to stop (its patience
    ran out) stops the resumed fit at once, instead of training one more epoch before checking again. Lightning
    keeps the counters in the checkpoint but not the decision (``trainer.should_stop``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decided = False

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"EarlyStopping{kwargs!r}"  # Lightning's key: checkpoints of either class load into the other

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        self.decided = self.decided or should_stop
        return should_stop, reason

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decided": self.decided}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.decided = bool(state_dict.get("decided", False))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decided:
            trainer.should_stop = True
