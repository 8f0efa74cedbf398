"""Pretrained backbone weights: ImageNet from torchvision (cached in TORCH_HOME), none, or a local file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision import models

from segvoc.errors import WeightsError

_ARCH = {
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}


def weights_help(arch: str) -> str:
    """How to fix missing weights, as one sentence."""
    fname = Path(_ARCH[arch][1].url).name
    return (f"pass model.weights=/path/to/{fname}, put that file in $TORCH_HOME/hub/checkpoints, "
            "or use model.weights=none")


def check_cached_hash(url: str, arch: str) -> None:
    """A hub file already in ``$TORCH_HOME/hub/checkpoints`` is checked against the sha256 prefix in its name (torch
    checks only what it downloads); a mismatch is a one-line ``WeightsError``."""
    name = Path(urlparse(url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    known = torch.hub.HASH_REGEX.search(name)
    if not cached.is_file() or known is None:
        return
    digest = hashlib.sha256()
    with open(cached, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(known.group(1)):
        raise WeightsError(f"{cached}: its sha256 does not start with {known.group(1)}, as its name says: not the "
                           f"published {arch} weights; delete it to download them again, or {weights_help(arch)}")


def load_backbone_state(weights: str | None, arch: str = "resnet34") -> dict[str, torch.Tensor] | None:
    """State dict for ``weights``: ``imagenet`` (torchvision IMAGENET1K_V1), ``none``/None, or a path to a saved
    state dict of ``arch``. Every failure is a one-line ``WeightsError`` saying how to fix it."""
    if weights in (None, "none"):
        return None
    builder, imagenet = _ARCH[arch]
    if weights == "imagenet":
        check_cached_hash(imagenet.url, arch)
        try:  # tensors only (never unpickled code), and a download checked against the hash in its name
            return imagenet.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except Exception as exc:  # offline: URLError, socket errors, ... all mean the same to the user
            raise WeightsError(
                f"cannot get ImageNet {arch} weights ({type(exc).__name__}: {str(exc)[:80]}); {weights_help(arch)}"
            ) from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; {weights_help(arch)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable state dict ({type(exc).__name__}); {weights_help(arch)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    expected = builder().state_dict()
    if not isinstance(state, dict) or not all(
        k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items() if k != "fc.weight"
        and k != "fc.bias"
    ):
        raise WeightsError(f"{path}: not a {arch} state dict (keys/shapes differ); {weights_help(arch)}")
    return state
