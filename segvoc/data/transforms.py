"""Albumentations pipelines from config, batch collation, and on-device normalisation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from segvoc.data.device_augment import plan_tensors
from segvoc.data.palette import IGNORE_INDEX


def build_pipeline(steps: ListConfig | Sequence[DictConfig] | None) -> A.Compose | None:
    """Instantiate a list of ``_target_: albumentations.X`` entries into one ``A.Compose`` (None if empty)."""
    if not steps:
        return None
    return A.Compose([instantiate(step) for step in steps])


def seed_pipeline(pipeline: A.Compose, seed: int) -> None:
    """Seed a pipeline so that its steps draw one after another from one ``random.Random(seed)`` stream (what
    ``data.device_augment`` replays). ``Compose.set_random_seed`` would give every step its own generator seeded
    alike: each step's first draw would then be the same number, so a flip, a rotation (both p=0.5) and a scale
    below 1 would always come together."""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def pad_collate(samples: list[dict]) -> dict:
    """Stack samples, padding images with 0 and masks with 255 (ignore) up to the largest H and W.

    ``size`` (N,2) holds each sample's own H and W before this padding: what depends on one image alone (the
    feature cache) crops it back out, so it never depends on the image's batch mates. Samples carrying a device
    augmentation plan (``data.device_augment``) keep their plans (``augment``, ``augment_rows``) and ``size`` is
    then their size after augmentation, on the device (``device_augment.augment_batch``)."""
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)
    images = torch.zeros((len(samples), 3, h, w), dtype=samples[0]["image"].dtype)
    masks = torch.full((len(samples), h, w), IGNORE_INDEX, dtype=samples[0]["mask"].dtype)
    for k, s in enumerate(samples):
        sh, sw = s["image"].shape[-2:]
        images[k, :, :sh, :sw] = s["image"]
        masks[k, :sh, :sw] = s["mask"]
    sizes = torch.tensor([list(s["image"].shape[-2:]) for s in samples], dtype=torch.long)
    batch = {"image": images, "mask": masks, "id": [s["id"] for s in samples], "size": sizes}
    if "augment" in samples[0]:
        plans = [s["augment"] for s in samples]
        batch |= {"augment": plans, "augment_rows": plan_tensors(plans),
                  "size": torch.tensor([[p.out_height, p.out_width] for p in plans], dtype=torch.long)}
    return batch


class Normalize(torch.nn.Module):
    """uint8 (N,3,H,W) in [0,255] -> float, normalised with per-channel mean/std given in 0-1 units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.scale - self.shift).contiguous(memory_format=self.memory_format)
