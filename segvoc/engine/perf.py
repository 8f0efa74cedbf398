"""Performance knobs from ``cfg.perf``: channels-last memory format and ``torch.compile``."""

from __future__ import annotations

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
