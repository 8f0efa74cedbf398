"""Write a trained task as a self-contained ONNX or TorchScript file (read back by ``segvoc.deploy.exported``).

The exported graph's contract, for every model segvoc trains:

* input ``images``: uint8 RGB ``(N, 3, H, W)``, N, H and W dynamic (any size, not only multiples of 32);
* inside: the run's normalisation, zero padding to the model's size divisor, cropping back;
* output ``logits``: float32 ``(N, C, H, W)``; or, with ``returns=mask``, ``mask``: int64 ``(N, H, W)`` (argmax).

The file carries the run config, class names and class weights as metadata (ONNX ``metadata_props``, TorchScript
``_extra_files``), so ``segvoc.evaluate`` and ``segvoc.predict`` can score and run it like a checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from segvoc.deploy.exported import load_runner
from segvoc.deploy.formats import FORMATS, METADATA_KEY, torchscript_quiet
from segvoc.errors import ConfigError, ExportError
from segvoc.extras import require
from segvoc.safety.trust import SIGNATURE_KEY
from segvoc.utils import one_line, temp_beside

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from segvoc.engine.task import SegmentationTask

RETURNS = ("logits", "mask")


class DeployModel(nn.Module):
    """uint8 RGB images (N,3,H,W) -> logits (N,C,H,W) float32, or the argmax mask (N,H,W) int64.

    ``net`` maps normalised images whose sides are multiples of ``size_divisor`` to logits of the same size;
    the zero padding (in normalised space, as ``SegmentationModel`` does) and the crop happen here.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], size_divisor: int = 1,
                 returns: str = "logits") -> None:
        super().__init__()
        if returns not in RETURNS:
            raise ConfigError(f"returns={returns!r}: use logits or mask")
        self.net = net
        self.size_divisor = int(size_divisor)
        self.argmax = returns == "mask"
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2], images.shape[-1]
        x = images.float() * self.scale - self.shift
        d = self.size_divisor
        x = F.pad(x, [0, (d - w % d) % d, 0, (d - h % d) % d])
        logits = self.net(x)[:, :, :h, :w]
        if self.argmax:
            return logits.argmax(1)
        return logits


class _Segment(nn.Module):
    """The padding-free core of a ``SegmentationModel`` (its ``segment``), or any other model as it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segment = getattr(self.model, "segment", None)
        out = segment(x) if segment is not None else self.model(x)
        return out["out"] if isinstance(out, dict) else out


def deploy_model(task: SegmentationTask, returns: str = "logits") -> DeployModel:
    """The task's model in eval mode behind the uint8-in contract (see the module docstring)."""
    model = task.model.eval()
    mean = (task.normalize.shift / (task.normalize.scale * 255.0)).flatten().tolist()
    std = (1.0 / (255.0 * task.normalize.scale)).flatten().tolist()
    divisor = int(getattr(model, "size_divisor", 1)) if hasattr(model, "segment") else 1
    return DeployModel(_Segment(model), mean, std, divisor, returns).eval()


@dataclass
class ParityCheck:
    """Exported file vs the task's own forward pass (normalise + model) on random uint8 images of odd sizes."""

    sizes: list[list[int]]
    max_abs_diff: float
    argmax_agreement: float  # over the decided pixels (see ``decided_pixels``)
    tied_fraction: float = 0.0  # pixels left out of the agreement: their top two logits lie within the tolerance


def decided_pixels(reference: torch.Tensor, max_abs_diff: float) -> torch.Tensor:
    """Pixels whose argmax a file within ``max_abs_diff`` of ``reference`` (N,C,H,W) cannot change: the top two
    logits differ by more than ``2 * max_abs_diff``. Elsewhere the classes tie at the tolerance, and a flip there
    says nothing about the file (random weights hold such ties: a difference of 1.5e-7 once flipped 1 of 5,760
    pixels)."""
    top2 = reference.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 2 * max_abs_diff


def reference_logits(task: SegmentationTask, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own logits for uint8 ``images`` at their own size: the task's normalisation and model, the
    path whole-image evaluation takes (``SegmentationModel`` pads to its size divisor and crops back itself)."""
    with torch.no_grad():
        return task._logits(task.normalize(images)).float()


def check_parity(task: SegmentationTask, run: Any, returns: str = "logits",
                 sizes: tuple[tuple[int, int], ...] = ((97, 131), (64, 45)), seed: int = 0,
                 max_abs_diff: float = 1e-4, min_agreement: float = 1.0) -> ParityCheck:
    """Run the exported file's runner ``run`` and the task itself on the same random images; raise
    ``ExportError`` if shapes differ, a logit differs by more than ``max_abs_diff`` (``returns=logits``), or fewer
    than ``min_agreement`` of the pixels get the same class (pixels that tie within the tolerance count as agreeing:
    ``decided_pixels``)."""
    g = torch.Generator().manual_seed(seed)
    worst, agree, tied = 0.0, 1.0, 0.0
    task = task.eval()
    for h, w in sizes:
        images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=g)
        reference = reference_logits(task, images)
        out = run(images)
        expected = reference.shape if returns == "logits" else reference[:, 0].shape
        if tuple(out.shape) != tuple(expected):
            raise ExportError(f"exported graph gives shape {tuple(out.shape)} for input {h}x{w}, PyTorch "
                              f"{tuple(expected)}: the export did not keep the sizes dynamic")
        if returns == "logits":
            worst = max(worst, float((reference - out.float()).abs().max()))
            out = out.argmax(1)
        decided = decided_pixels(reference, max_abs_diff)
        same = (reference.argmax(1) == out) | ~decided
        agree = min(agree, float(same.float().mean()))
        tied = max(tied, 1.0 - float(decided.float().mean()))
    if worst > max_abs_diff or agree < min_agreement:
        raise ExportError(f"exported file differs from the checkpoint's own forward pass: max abs logit difference "
                          f"{worst:.3g} (allowed {max_abs_diff:g}), argmax agreement {agree:.6f} (required "
                          f"{min_agreement:g}; {tied:.2g} of the pixels tie within the tolerance and are left out); "
                          "the file was not written. Please report this model/format combination")
    return ParityCheck([list(s) for s in sizes], worst, agree, tied)


def _example() -> torch.Tensor:
    # batch 2, odd sizes: torch.export specialises sizes 0 and 1, so the example must not pin any dimension
    return torch.randint(0, 256, (2, 3, 97, 131), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def export_onnx(module: DeployModel, path: Path, metadata: dict[str, Any], opset: int) -> None:
    """ONNX via ``torch.onnx.export(dynamo=True)`` with dynamic N, H, W; metadata in ``metadata_props``."""
    import onnx

    batch, height, width = (torch.export.Dim(n, min=1, max=16384) for n in ("batch", "height", "width"))
    output = "mask" if module.argmax else "logits"
    # onnx_ir / onnxscript log every graph pass at INFO, which Hydra's root logger would print; keep warnings
    quiet = {name: logging.getLogger(name) for name in ("onnx_ir", "onnxscript")}
    levels = {name: lg.level for name, lg in quiet.items()}
    for lg in quiet.values():
        lg.setLevel(logging.WARNING)
    try:
        torch.onnx.export(module, (_example(),), str(path), input_names=["images"], output_names=[output],
                          dynamic_shapes={"images": {0: batch, 2: height, 3: width}}, opset_version=opset,
                          dynamo=True, external_data=False, verbose=False)
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save(proto, str(path))
    finally:
        for name, lg in quiet.items():
            lg.setLevel(levels[name])


def export_torchscript(module: DeployModel, path: Path, metadata: dict[str, Any]) -> None:
    """TorchScript: the wrapper is scripted (sizes stay dynamic), the network traced on a padded example."""
    d = max(module.size_divisor, 1)
    sample = torch.zeros(1, 3, 2 * max(d, 32), 3 * max(d, 32))
    with torchscript_quiet():
        traced = torch.jit.trace(module.net, sample, check_trace=False)
        wrapper = DeployModel(traced, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], module.size_divisor,
                              "mask" if module.argmax else "logits")
        with torch.no_grad():
            wrapper.scale.copy_(module.scale)
            wrapper.shift.copy_(module.shift)
        scripted = torch.jit.script(wrapper.eval())
    with torchscript_quiet():
        torch.jit.save(scripted, str(path), _extra_files={METADATA_KEY: json.dumps(metadata)})


def export(task: SegmentationTask, path: Path, fmt: str, metadata: dict[str, Any], returns: str = "logits",
           opset: int = 18, max_abs_diff: float = 1e-4, min_agreement: float = 1.0) -> ParityCheck:
    """Write ``task`` to ``path`` in ``fmt`` (onnx | torchscript): into a temporary file first, which must pass
    ``check_parity`` against the task before it replaces ``path`` (a failed check leaves an earlier export)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: use onnx or torchscript")
    if fmt == "onnx":
        require("export", "format=onnx")
    module = deploy_model(task, returns)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**metadata, "returns": returns, "format": fmt, "opset": opset if fmt == "onnx" else None}
    tmp = temp_beside(path)  # unique per call; keeps the suffix, which tells load_runner the format
    try:
        try:
            if fmt == "onnx":
                export_onnx(module, tmp, metadata, opset)
            else:
                export_torchscript(module, tmp, metadata)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"{type(task.model).__name__}: {fmt} export failed ({type(exc).__name__}: "
                              f"{one_line(str(exc).splitlines()[0], 160)}); try format="
                              f"{'torchscript' if fmt == 'onnx' else 'onnx'}") from exc
        parity = check_parity(task, load_runner(tmp), returns, max_abs_diff=max_abs_diff,
                              min_agreement=min_agreement)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return parity


def export_metadata(task: SegmentationTask, source: Path, epoch: int | None) -> dict[str, Any]:
    """What ``segvoc.deploy.exported`` needs to evaluate the file like its checkpoint, plus provenance."""
    from segvoc import __version__

    weights = getattr(task.criterion, "class_weight", None)
    return {
        "config": task.hparams.get("cfg"),
        SIGNATURE_KEY: task.hparams.get(SIGNATURE_KEY),  # the checkpoint's signature of that config (safety.trust)
        "class_names": list(task.class_names),
        "colors": task.palette[: len(task.class_names)].tolist(),  # the dataset's colours, in class order
        "class_weights": weights.tolist() if weights is not None else None,
        "epoch": epoch,
        "source": str(source),
        "segvoc": __version__,
        "torch": torch.__version__,
    }


def parity_tolerance(cfg: DictConfig, model: str | None) -> dict[str, float]:
    """``conf/export.yaml``'s ``parity``: the report models' tolerance, or a reference model's looser one."""
    parity = cfg.parity
    looser = (parity.get("references") or {}).get(model) if model else None
    return {"max_abs_diff": float(looser if looser is not None else parity.max_abs_diff),
            "min_agreement": float(parity.min_agreement)}
