"""``data.device_augment``: the ``augment.train`` pipeline drawn on the host, applied on the device.

Loader workers then only decode (or read ``data.decode_cache``) and hand uint8 images and masks over; the geometry
runs where the model runs (torchgeo's pattern: ``on_after_batch_transfer``).

* ``DeviceAugment.from_steps`` translates the albumentations steps of an augment preset (the ``_target_`` list of
  ``conf/augment/*.yaml``) into plain steps; a step or setting it cannot run is one ``ConfigError`` line.
* ``DeviceAugment.draw`` (in the worker, per sample) draws the parameters with ``random.Random`` seeded by (seed,
  epoch, index), in albumentations' order: ``A.Compose``'s own draw, then per step its ``p`` draw (when 0 < p < 1)
  and its parameters. The result, a ``Plan``, holds only host numbers: the resized sizes, the angle's sampling
  matrix, pads and crop offsets. Exactly resumable, independent of workers, like the albumentations pipeline.
* ``augment_batch`` (on the device, per sample) runs a batch's plans with ``torchvision.transforms.v2.functional``
  on uint8 tensors: bilinear for images, nearest for masks, fills from the config (masks 255). Rotation is
  torchvision's ``rotate`` (same sampling grid, same fill blending, bit for bit) with the matrix brought over in the
  batch: ``F.rotate`` itself builds it with ``torch.tensor(..., device=...)``, a blocking copy (a host sync) per
  call on a GPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.nn.functional import grid_sample
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from segvoc.data.palette import IGNORE_INDEX
from segvoc.errors import ConfigError

BORDER_CONSTANT = 0  # cv2.BORDER_CONSTANT
INTER_NEAREST, INTER_LINEAR = 0, 1  # cv2 flags
ANY, NUMBER = object(), object()  # DeviceAugment.SUPPORTED: any value; an int or float


class Plan(NamedTuple):
    """One sample's augmentation: its decoded (height, width), the ops to run in order, and the output size."""

    height: int
    width: int
    ops: tuple[tuple, ...]
    out_height: int
    out_width: int


def _fix_message(target: str, why: str) -> str:
    return (f"data.device_augment=true cannot run augment.train's {target} on the device ({why}); use "
            "augment=report or augment=none, or set data.device_augment=false")


def _limits(value: Any, name: str, target: str) -> tuple[float, float]:
    """albumentations' ``to_tuple``: a number v means (-v, v), a pair is kept."""
    if isinstance(value, (int, float)):
        return -float(value), float(value)
    if isinstance(value, Sequence) and len(value) == 2:
        return float(value[0]), float(value[1])
    raise ConfigError(_fix_message(target, f"{name}={value!r}: a number or a pair"))


class DeviceAugment:
    """The translated steps of one augment pipeline; ``draw`` per sample on the host, ``augment_batch`` on the
    device."""

    # the arguments each supported step takes: ANY value, a NUMBER, or one of the listed values
    SUPPORTED: Mapping[str, Mapping[str, Any]] = {
        "HorizontalFlip": {"p": NUMBER},
        "VerticalFlip": {"p": NUMBER},
        "RandomScale": {"p": NUMBER, "scale_limit": ANY, "interpolation": (INTER_LINEAR,),
                        "mask_interpolation": (INTER_NEAREST,), "area_for_downscale": (None,)},
        "Rotate": {"p": NUMBER, "limit": ANY, "border_mode": (BORDER_CONSTANT,), "fill": NUMBER, "fill_mask": NUMBER,
                   "interpolation": (INTER_LINEAR,), "mask_interpolation": (INTER_NEAREST,), "crop_border": (False,)},
        "PadIfNeeded": {"p": NUMBER, "min_height": ANY, "min_width": ANY, "pad_height_divisor": ANY,
                        "pad_width_divisor": ANY, "position": ("center", "top_left"),
                        "border_mode": (BORDER_CONSTANT,), "fill": NUMBER, "fill_mask": NUMBER},
        "RandomCrop": {"p": NUMBER, "height": ANY, "width": ANY, "pad_if_needed": (False,)},
    }
    DEFAULT_P = {"RandomScale": 0.5, "Rotate": 0.5, "HorizontalFlip": 0.5, "VerticalFlip": 0.5}

    def __init__(self, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
        self.steps = list(steps)

    @classmethod
    def from_steps(cls, steps: Sequence[Mapping[str, Any]] | None) -> DeviceAugment:
        """Translate ``augment.train`` entries (``_target_: albumentations.X`` + arguments); raise ``ConfigError``
        naming ``data.device_augment`` and the step for anything else."""
        out = []
        for step in steps or []:
            step = dict(step)
            target = str(step.pop("_target_", "?"))
            name = target.removeprefix("albumentations.").removeprefix("augmentations.")
            allowed = cls.SUPPORTED.get(name)
            if allowed is None or not target.startswith("albumentations."):
                raise ConfigError(_fix_message(target, "supported: " + ", ".join(cls.SUPPORTED)))
            for key, value in step.items():
                if key not in allowed:
                    raise ConfigError(_fix_message(target, f"its argument {key} is not supported"))
                only = allowed[key]
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = only is ANY or (only is NUMBER and number) or (isinstance(only, tuple) and value in only)
                if not ok:
                    supported = "a number" if only is NUMBER else " or ".join(map(repr, only))
                    raise ConfigError(_fix_message(target, f"{key}={value!r}; supported: {supported}"))
            p = float(step.get("p", cls.DEFAULT_P.get(name, 1.0)))
            args: dict[str, Any] = {"p": p}
            if name == "RandomScale":
                args["scale"] = _limits(step.get("scale_limit", 0.1), "scale_limit", target)
            elif name == "Rotate":
                args["limit"] = _limits(step.get("limit", 90), "limit", target)
                args["fill"], args["fill_mask"] = float(step.get("fill", 0)), float(step.get("fill_mask", 0))
            elif name == "PadIfNeeded":
                args |= {k: step.get(k, d) for k, d in (("min_height", 1024), ("min_width", 1024),
                                                         ("pad_height_divisor", None), ("pad_width_divisor", None),
                                                         ("position", "center"))}
                args["fill"], args["fill_mask"] = float(step.get("fill", 0)), float(step.get("fill_mask", 0))
            elif name == "RandomCrop":
                args["height"], args["width"] = int(step["height"]), int(step["width"])
            out.append((name, args))
        return cls(out)

    def draw(self, seed: int, height: int, width: int) -> Plan:
        """The plan of one sample of ``height`` x ``width``, from ``random.Random(seed)`` in albumentations' order."""
        rng = random.Random(seed)
        rng.random()  # A.Compose(p=1.0) draws once before its steps
        ops: list[tuple] = []
        h, w = height, width
        for name, a in self.steps:
            p = a["p"]
            if p <= 0 or (p < 1 and not rng.random() < p):
                continue
            if name == "HorizontalFlip":
                ops.append(("hflip",))
            elif name == "VerticalFlip":
                ops.append(("vflip",))
            elif name == "RandomScale":
                s = rng.uniform(*a["scale"]) + 1.0
                h, w = int(h * s), int(w * s)  # albumentations' geometric.functional.scale
                ops.append(("resize", h, w))
            elif name == "Rotate":
                angle = rng.uniform(*a["limit"])
                if angle % 360 != 0:
                    ops.append(("rotate", rotation_matrix(angle), w, h, a["fill"], a["fill_mask"]))
            elif name == "PadIfNeeded":
                top, bottom = _pad(h, a["min_height"], a["pad_height_divisor"])
                left, right = _pad(w, a["min_width"], a["pad_width_divisor"])
                if a["position"] == "top_left":
                    top, bottom, left, right = 0, top + bottom, 0, left + right
                if top or bottom or left or right:
                    ops.append(("pad", left, top, right, bottom, a["fill"], a["fill_mask"]))
                h, w = h + top + bottom, w + left + right
            elif name == "RandomCrop":
                ch, cw = a["height"], a["width"]
                if ch > h or cw > w:
                    raise ConfigError(f"augment.train RandomCrop {ch}x{cw} is larger than an image ({h}x{w}) at that "
                                      "point; put PadIfNeeded before it (augment=report does)")
                h_start, w_start = rng.random(), rng.random()
                top, left = int((h - ch + 1) * h_start), int((w - cw + 1) * w_start)
                ops.append(("crop", top, left, ch, cw))
                h, w = ch, cw
        return Plan(height, width, tuple(ops), h, w)


def _pad(size: int, minimum: int | None, divisor: int | None) -> tuple[int, int]:
    """albumentations' ``get_dimension_padding``: (before, after)."""
    if minimum is not None:
        if size < minimum:
            before = int((minimum - size) / 2.0)
            return before, minimum - size - before
    elif divisor is not None and size % divisor:
        total = divisor - size % divisor
        return total // 2, total - total // 2
    return 0, 0


def rotation_matrix(angle: float) -> tuple[float, ...]:
    """The sampling matrix (output pixel -> input pixel, centred coordinates) of torchvision's ``rotate`` by
    ``angle`` degrees counter-clockwise, computed as its ``_get_inverse_affine_matrix`` does (no shear, scale 1)."""
    rot = math.radians(-(angle % 360))
    cos, sin = math.cos(rot), math.sin(rot)
    return (cos, sin, 0.0, -sin, cos, 0.0)


def plan_tensors(plans: Sequence[Plan]) -> torch.Tensor:
    """(N, 8) float32: per sample the rotation matrix and half its input size (zeros without rotation), so the
    device gets them with the batch instead of one blocking copy per rotation."""
    rows = torch.zeros((len(plans), 8), dtype=torch.float32)
    for k, plan in enumerate(plans):
        for op in plan.ops:
            if op[0] == "rotate":
                rows[k] = torch.tensor([*op[1], 0.5 * op[2], 0.5 * op[3]], dtype=torch.float32)
    return rows


def rotate(image: torch.Tensor, row: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
    """torchvision v2 ``rotate_image`` (``expand=False``, centre) on a (C,H,W) tensor, with its matrix and half
    size in ``row`` (``plan_tensors``) already on the device: the same float32 grid, ``grid_sample`` and fill."""
    c, h, w = image.shape
    theta = row[:6].view(1, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=image.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=image.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=image.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    grid = base.view(1, h * w, 3).bmm(theta.transpose(1, 2).div(row[6:8])).view(1, h, w, 2)
    x = torch.cat((image.to(torch.float32)[None], torch.ones((1, 1, h, w), device=image.device)), dim=1)
    x = grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    x, inside = torch.tensor_split(x, indices=(-1,), dim=-3)
    inside = inside.expand_as(x)
    if mode == "nearest":
        x = torch.where(inside < 0.5, torch.full_like(x, fill), x)
    else:
        x = x.sub_(fill).mul_(inside).add_(fill)
    return x.round_().to(image.dtype)[0]


def _run(image: torch.Tensor, mask: torch.Tensor, plan: Plan, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask[None]  # (1,H,W): torchvision's image kernels
    for op in plan.ops:
        kind = op[0]
        if kind == "hflip":
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        elif kind == "vflip":
            image, mask = F.vertical_flip(image), F.vertical_flip(mask)
        elif kind == "resize":
            # antialias off: albumentations (cv2 INTER_LINEAR) does not low-pass before shrinking either
            image = F.resize(image, [op[1], op[2]], InterpolationMode.BILINEAR, antialias=False)
            mask = F.resize(mask, [op[1], op[2]], InterpolationMode.NEAREST)
        elif kind == "rotate":
            image, mask = rotate(image, row, "bilinear", op[4]), rotate(mask, row, "nearest", op[5])
        elif kind == "pad":
            left, top, right, bottom, fill, fill_mask = op[1:]
            image = F.pad(image, [left, top, right, bottom], fill=fill)
            mask = F.pad(mask, [left, top, right, bottom], fill=fill_mask)
        elif kind == "crop":
            image, mask = F.crop(image, *op[1:]), F.crop(mask, *op[1:])
    return image, mask[0]


def augment_batch(batch: dict) -> dict:
    """Run each sample's plan on the batch's device. In: ``pad_collate``'s padded uint8 ``image``/``mask`` with
    ``augment`` (the plans) and ``augment_rows`` (``plan_tensors``). Out: what ``pad_collate`` gives without device
    augmentation (``size``: the augmented sizes, made on the host by the collate: no host copy here)."""
    plans: Sequence[Plan] = batch["augment"]
    images, masks, rows = batch["image"], batch["mask"], batch["augment_rows"]
    oh, ow = max(p.out_height for p in plans), max(p.out_width for p in plans)
    out_images = images.new_zeros((len(plans), images.shape[1], oh, ow))
    out_masks = masks.new_full((len(plans), oh, ow), IGNORE_INDEX)
    for k, plan in enumerate(plans):
        image, mask = _run(images[k, :, :plan.height, :plan.width], masks[k, :plan.height, :plan.width], plan, rows[k])
        out_images[k, :, :plan.out_height, :plan.out_width] = image
        out_masks[k, :plan.out_height, :plan.out_width] = mask
    rest = {k: v for k, v in batch.items() if k not in ("image", "mask", "augment", "augment_rows")}
    return {"image": out_images, "mask": out_masks, **rest}
