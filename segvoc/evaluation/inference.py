"""Inference modes shared by training-time evaluation, ``segvoc.evaluate`` and ``segvoc.predict``.

``mode``: ``whole`` (the image in one pass) or ``slide`` (overlapping windows, averaged; for large images).
``tta``: ``none``, ``flip`` (average with the horizontally flipped pass) or ``ms_flip`` (scales x flip).
Every mode returns class log-probabilities; multiple passes average softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segvoc.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class InferenceConfig:
    """How to turn a normalised image batch into class scores. The values (and their defaults) live in
    ``conf/infer/default.yaml``; ``InferenceConfig.defaults(**changes)`` reads them from there."""

    mode: str                    # whole | slide | auto (slide when the image is larger than max_pixels)
    tta: str                     # none | flip | ms_flip
    scales: Sequence[float]
    window: int
    stride: int | None           # None: two thirds of the window
    max_pixels: int

    @classmethod
    def defaults(cls, **changes: object) -> InferenceConfig:
        """``conf/infer/default.yaml`` with ``changes`` applied."""
        from omegaconf import OmegaConf

        from segvoc.config import CONF_DIR

        return cls(**{**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "infer" / "default.yaml")), **changes})

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide", "auto"):
            raise ConfigError(f"infer.mode={self.mode!r}: use whole, slide or auto")
        if self.tta not in ("none", "flip", "ms_flip"):
            raise ConfigError(f"tta={self.tta!r}: use none, flip or ms_flip")
        if self.window < 1:
            raise ConfigError(f"infer.window={self.window}: use a positive window size")
        if self.stride is None:
            self.stride = max(1, self.window * 2 // 3)
        if not 1 <= self.stride <= self.window:
            raise ConfigError(f"infer.stride={self.stride} with infer.window={self.window}: windows would leave "
                              "pixels unscored; use a stride between 1 and the window (or infer.stride=null)")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis: every ``stride`` pixels, plus one flush with the far border, so
    windows of ``window`` pixels cover ``[0, size)`` whenever ``stride <= window``."""
    starts = list(range(0, max(size - window, 0) + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def slide_logits(forward: Forward, x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Logits from overlapping ``window`` x ``window`` crops every ``stride`` pixels, averaged where they overlap.
    Every pixel is covered by at least one window (``stride <= window``; checked by ``InferenceConfig``)."""
    if not 1 <= stride <= window:
        raise ConfigError(f"infer.stride={stride} with infer.window={window}: use a stride between 1 and the window")
    n, _, h, w = x.shape
    out: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
    for y0 in ys:
        for x0 in xs:
            crop = x[..., y0:y0 + window, x0:x0 + window]
            logits = forward(crop)
            if out is None:
                out = torch.zeros((n, logits.shape[1], h, w), device=x.device, dtype=logits.dtype)
            out[..., y0:y0 + crop.shape[-2], x0:x0 + crop.shape[-1]] += logits
            count[..., y0:y0 + crop.shape[-2], x0:x0 + crop.shape[-1]] += 1
    assert out is not None
    return out / count


def single_pass(forward: Forward, x: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Logits of one pass in the configured mode."""
    h, w = x.shape[-2:]
    slide = cfg.mode == "slide" or (cfg.mode == "auto" and h * w > cfg.max_pixels)
    if slide and (h > cfg.window or w > cfg.window):
        return slide_logits(forward, x, cfg.window, cfg.stride)
    return forward(x)


def infer(forward: Forward, x: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Class log-probabilities (N,C,H,W, float32) for a normalised batch ``x``: the log-softmax of a single pass,
    or the log of the softmax probabilities averaged over flips (``flip``) and scales (``ms_flip``)."""
    if cfg.tta == "none":
        return single_pass(forward, x, cfg).float().log_softmax(1)
    h, w = x.shape[-2:]
    scales = cfg.scales if cfg.tta == "ms_flip" else (1.0,)
    probs = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flip in (False, True):
            inp = xs.flip(-1) if flip else xs
            logits = single_pass(forward, inp, cfg)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = logits.float().softmax(1)
            probs = p if probs is None else probs + p
    assert probs is not None
    return (probs / (2 * len(scales))).clamp_min(1e-12).log()


@torch.no_grad()
def predict_mask(predict_log_probs: Forward, image: np.ndarray, device: torch.device | str = "cpu",
                 max_side: int = 2048) -> np.ndarray:
    """Class-index mask (H,W uint8) of one RGB uint8 image, at the image's own size. Images whose longest side
    exceeds ``max_side`` are shrunk for inference and the mask is resized back (nearest)."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # a 100000 x 10 image keeps a 1-pixel side
    src = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    x = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None].to(device)
    mask = predict_log_probs(x).argmax(1)[0].to(torch.uint8).cpu().numpy()
    if scale < 1:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask
