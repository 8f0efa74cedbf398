"""``model.cache_features``: train a frozen encoder's decoder from features computed once per training image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from segvoc.config import choice
from segvoc.errors import ConfigError


class FeatureCache:
    """Encoder features by image id, for models with a frozen ``encode`` and a trainable ``decode``.

    Valid only when the training inputs of an id never change (no random augmentation): ``for_config`` checks it.
    """

    def __init__(self, model: nn.Module) -> None:
        if not (getattr(model, "freeze_encoder", False) and hasattr(model, "encode") and hasattr(model, "decode")):
            raise ConfigError(f"model.cache_features=true needs a frozen encoder with encode/decode (such as "
                              f"resnet34_transfer); {type(model).__name__} has none: set model.cache_features=false")
        self.model = model
        self.features: dict[str, torch.Tensor] = {}

    @classmethod
    def for_config(cls, cfg: DictConfig, model: nn.Module) -> FeatureCache | None:
        """The cache when ``model.cache_features`` asks for one (and the training inputs allow it), else None."""
        if not cfg.model.get("cache_features"):
            return None
        augment = choice(cfg, "augment")
        if augment != "none":
            raise ConfigError(f"model.cache_features=true needs deterministic training inputs, but augment="
                              f"{augment} is random; use augment=none or model.cache_features=false")
        return cls(model)

    def logits(self, images: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
        """Decoder logits for normalised ``images``; only ids not seen before go through the encoder."""
        divisor = getattr(self.model, "size_divisor", 1)
        h, w = images.shape[-2:]
        if h % divisor or w % divisor:
            raise ConfigError(f"model.cache_features needs training images whose sides are multiples of {divisor}; "
                              f"got {h}x{w}: set data.image_size accordingly")
        missing = [k for k, i in enumerate(ids) if i not in self.features]
        if missing:
            for k, f in zip(missing, self.model.encode(images[missing]), strict=True):
                self.features[ids[k]] = f
        return self.model.decode(torch.stack([self.features[i] for i in ids]))
