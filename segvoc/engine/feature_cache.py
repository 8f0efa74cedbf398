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
    Each id is encoded alone at its own (pipeline-padded) size, never at its batch's padded size, so its features
    do not depend on which images shared its batch. The features live on the CPU (in pinned memory when the model
    runs on a GPU; about 0.4 MB per 512x384 image in fp32) and are zero-padded to the batch's largest feature map
    when a batch is assembled. The decoder runs eagerly: ``perf.compile`` compiles the model's ``forward``, which
    the cached path does not call.
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

    def nbytes(self) -> int:
        """Memory the cached features hold."""
        return sum(f.numel() * f.element_size() for f in self.features.values())

    def logits(self, images: torch.Tensor, ids: Sequence[str], sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits for normalised ``images`` (a ``pad_collate`` batch); only ids not seen before go through
        the encoder, each cropped to its own size ``sizes[k]`` (default: the batch's size)."""
        divisor = getattr(self.model, "size_divisor", 1)
        own = ([tuple(images.shape[-2:])] * len(ids) if sizes is None
               else [(int(h), int(w)) for h, w in sizes.tolist()])
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, i in enumerate(ids):
            if i not in self.features:
                by_size.setdefault(own[k], []).append(k)
        pin = images.device.type == "cuda"
        for (h, w), ks in by_size.items():
            if h % divisor or w % divisor:
                raise ConfigError(f"model.cache_features needs training images whose sides are multiples of "
                                  f"{divisor}; got {h}x{w} for id {ids[ks[0]]}: pad them in the augment pipeline "
                                  f"(augment=none does) or set model.cache_features=false")
            for k, f in zip(ks, self.model.encode(images[ks, :, :h, :w]), strict=True):
                f = f.detach().to("cpu", copy=True)
                self.features[ids[k]] = f.pin_memory() if pin else f
        feats = [self.features[i] for i in ids]
        fh, fw = max(f.shape[-2] for f in feats), max(f.shape[-1] for f in feats)
        batch = torch.zeros((len(feats), *feats[0].shape[:-2], fh, fw), dtype=feats[0].dtype, pin_memory=pin)
        for k, f in enumerate(feats):
            batch[k, ..., :f.shape[-2], :f.shape[-1]] = f
        return self.model.decode(batch.to(images.device, non_blocking=True))
