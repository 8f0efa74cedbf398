"""Run exported files (``segvoc.deploy.exporting``) as a task: ``segvoc.evaluate`` and ``segvoc.predict`` accept
``ckpt=<model.onnx>`` or ``ckpt=<model.pt>`` (TorchScript) and score them with the same metric code."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segvoc.deploy.formats import METADATA_KEY, export_format, torchscript_quiet
from segvoc.engine.builders import build_loss, load_task
from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint, upgrade_config
from segvoc.engine.task import SegmentationTask
from segvoc.errors import ConfigError, WeightsError
from segvoc.evaluation.inference import InferenceConfig
from segvoc.extras import require
from segvoc.safety.trust import SIGNATURE_KEY, check_config

Runner = Callable[[torch.Tensor], torch.Tensor]


def _missing(path: Path) -> WeightsError:
    return WeightsError(f"{path}: exported model not found; write one with python -m segvoc.export ckpt=<run dir>")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata ``segvoc.export`` stored in the file (run config, class names, weights, epoch, returns)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing(path)
    if export_format(path) == "onnx":
        require("export", f"ckpt={path}")
    try:
        if export_format(path) == "onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            text = props.get(METADATA_KEY)
        else:
            files = {METADATA_KEY: ""}
            with torchscript_quiet():
                torch.jit.load(str(path), map_location="cpu", _extra_files=files)
            text = files[METADATA_KEY] or None
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read exported model ({type(exc).__name__}: {str(exc)[:100]}); "
                           "is the file complete?") from None
    if not text:
        raise WeightsError(f"{path}: no segvoc metadata; only files written by python -m segvoc.export can be "
                           "evaluated (others: load them with onnxruntime / torch.jit.load directly)")
    return json.loads(text)


def load_runner(path: str | Path) -> Runner:
    """A function uint8 images (N,3,H,W) -> the file's output, on the images' device (ONNX runs on the CPU
    unless onnxruntime's CUDA provider is installed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing(path)
    if export_format(path) == "onnx":
        require("export", f"ckpt={path}")
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        session = ort.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name

        def run_onnx(images: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {name: images.detach().cpu().numpy()})[0]
            return torch.from_numpy(out).to(images.device)

        return run_onnx
    with torchscript_quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_torchscript(images: torch.Tensor) -> torch.Tensor:
        module.to(images.device)
        with torch.no_grad():
            return module(images)

    return run_torchscript


class ExportedNet(nn.Module):
    """An exported file as the task's model: takes uint8 images (the file normalises), returns logits."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.run = load_runner(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


def exported_config(path: str | Path, trusted: Sequence[str] = ()) -> tuple[DictConfig, dict[str, Any]]:
    """The run config stored in an exported file, once every ``_target_`` in it has passed the allowlist (rule D,
    ``segvoc.safety.trust``), and the rest of its metadata."""
    meta = read_metadata(path)
    check_config(meta["config"], path, meta.get(SIGNATURE_KEY), trusted)
    return OmegaConf.create(upgrade_config(meta["config"])), meta


def load_exported_task(path: str | Path, inference: InferenceConfig | None = None,
                       trusted: Sequence[str] = ()) -> tuple[SegmentationTask, DictConfig]:
    """A ``SegmentationTask`` whose model is the exported file: same loss, metrics and inference modes as the
    checkpoint (whole, slide, flip), so ``segvoc.evaluate`` scores it exactly like the checkpoint."""
    cfg, meta = exported_config(path, trusted)
    if meta.get("returns") != "logits":
        raise ConfigError(f"{path}: exported with returns={meta.get('returns')}; evaluate/predict need the logits: "
                          "re-export with returns=logits")
    if inference is not None and inference.tta == "ms_flip":
        raise ConfigError(f"tta=ms_flip with ckpt={path}: an exported graph takes uint8 images at their own "
                          "size, so it cannot be fed rescaled images; use tta=flip, or the .ckpt for ms_flip")
    num_classes = int(cfg.data.num_classes)
    task = SegmentationTask(
        model=ExportedNet(path),
        criterion=build_loss(cfg, meta.get("class_weights")),
        optimizer=cfg.optimizer,
        num_classes=num_classes,
        class_names=meta.get("class_names"),
        colors=meta.get("colors"),
        inference=inference or InferenceConfig(**cfg.infer),
        cfg=OmegaConf.to_container(cfg, resolve=True),
    )
    task.normalize = nn.Identity()  # the exported graph normalises uint8 images itself
    task.eval()
    return task, cfg


def load_any_task(path: str | Path, inference: InferenceConfig | None = None,
                  trusted: Sequence[str] = ()) -> tuple[SegmentationTask, DictConfig]:
    """The task of a checkpoint (``segvoc.engine.builders.load_task``) or of an exported file (``.onnx``,
    TorchScript ``.pt``), in eval mode: what ``segvoc.evaluate`` and ``segvoc.predict`` accept as ``ckpt=``."""
    if export_format(path) is not None:
        return load_exported_task(path, inference, trusted)
    return load_task(path, inference, trusted)


def check_stored_config(path: str | Path, trusted: Sequence[str] = ()) -> None:
    """Read the config stored in a checkpoint, run directory or exported file and check it against the allowlist
    (rule D), building nothing: what ``segvoc.app.Preflight`` does before evaluate, predict or export write."""
    if export_format(path) is not None:
        exported_config(path, trusted)
    else:
        checkpoint_config(read_checkpoint(path), path, trusted)
