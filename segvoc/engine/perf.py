"""Performance knobs from ``cfg.perf``: channels-last memory format, ``torch.compile`` and cuDNN autotuning."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn


def prepare_model(model: nn.Module, perf: DictConfig | dict | None) -> nn.Module:
    """Apply ``perf.channels_last`` and ``perf.compile`` to a freshly built model."""
    perf = perf or {}
    if perf.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if perf.get("compile"):
        model.compile()  # in place: state-dict keys (checkpoints) stay those of the plain model
    return model


class CudnnBenchmark(pl.Callback):
    """``perf.cudnn_benchmark``: cuDNN autotuning (``torch.backends.cudnn.benchmark``) while training on fixed-size
    crops, off while evaluating full-resolution images of mixed sizes (each new size would be tuned again)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def _set(self, on: bool) -> None:
        torch.backends.cudnn.benchmark = on

    def _training_value(self) -> bool:
        # never under trainer.deterministic=true (autotuning may pick a nondeterministic algorithm)
        return self.enabled and not torch.are_deterministic_algorithms_enabled()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(self._training_value())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(self._training_value() and trainer.training)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(False)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(False)
