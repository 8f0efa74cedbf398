"""The training progress bar: Lightning's own, showing the training loss read at logging steps only.

A value logged with ``prog_bar=True, on_step=True`` is turned into a Python float (``.item()``, a host-device sync
on a GPU) by Lightning at every batch, and again at every refresh of the bar. Here the loss is logged without
``prog_bar`` and the bar reads it where the loggers read it anyway: every ``trainer.log_every_n_steps`` steps.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

LOSS_KEY = "train/loss_step"


class _LossAtLoggingSteps:
    """Adds ``loss`` (the last training loss read at a logging step) to the bar's metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, float] = {}

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        shown = self._shown
        if trainer.training and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            value = trainer.logged_metrics.get(LOSS_KEY)  # tensors; none of them prog_bar, so no conversion
            if value is not None:
                shown["loss"] = round(float(value), 4)  # the one sync, at a logging step
        return {**items, **shown}


class RichLoggedLossBar(_LossAtLoggingSteps, RichProgressBar):
    """``RichProgressBar`` (Lightning's default when rich is installed) with the loss at logging steps."""


class TQDMLoggedLossBar(_LossAtLoggingSteps, TQDMProgressBar):
    """``TQDMProgressBar`` with the loss at logging steps."""


def progress_bar() -> pl.Callback:
    """The bar Lightning would pick by default (rich if installed, else tqdm), showing the loss at logging steps."""
    return RichLoggedLossBar() if _RICH_AVAILABLE else TQDMLoggedLossBar()
