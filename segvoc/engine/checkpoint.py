"""Checkpoint files: written atomically, read safely (weights only), loaded into a task with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from segvoc.config import choice
from segvoc.errors import WeightsError
from segvoc.safety.trust import SIGNATURE_KEY, check_config
from segvoc.utils import atomic_write, one_line

if TYPE_CHECKING:
    from segvoc.engine.task import SegmentationTask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file in the same folder, fsyncs, then renames over the target:
    a crash during a save never leaves a truncated ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)


def read_checkpoint(path: str | Path, what: str = "ckpt") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled code.

    ``what``: the config key the path came from, named in the error when there is no such file."""
    path = Path(path).expanduser()
    if path.is_dir():  # a run directory: take its best checkpoint
        path = path / "checkpoints" / "best.ckpt"
    if not path.is_file():
        example = "<run dir>/checkpoints/last.ckpt" if what == "ckpt_path" else "<run dir>/checkpoints/best.ckpt"
        raise WeightsError(f"{what}={path}: checkpoint not found; pass {what}={example}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {one_line(exc)}); "
                           "is it a segvoc checkpoint, complete and not truncated?") from None
    if "state_dict" not in ckpt or "cfg" not in ckpt.get("hyper_parameters", {}):
        raise WeightsError(f"{path}: not a segvoc checkpoint (no state_dict/config); train one with segvoc.train")
    return ckpt


# Modules moved by segvoc 0.4's layout: a stored ``_target_`` naming an old module is read as the new one.
MOVED_MODULES = {
    "segvoc.losses": "segvoc.losses.segmentation",
    "segvoc.weighting": "segvoc.losses.weighting",
    "segvoc.metrics": "segvoc.evaluation.metrics",
    "segvoc.inference": "segvoc.evaluation.inference",
    "segvoc.visualize": "segvoc.evaluation.figures",
    "segvoc.task": "segvoc.engine.task",
    "segvoc.builders": "segvoc.engine.builders",
    "segvoc.interrupts": "segvoc.engine.interrupts",
    "segvoc.checkpoint": "segvoc.engine.checkpoint",
    "segvoc.feature_cache": "segvoc.engine.feature_cache",
    "segvoc.perf": "segvoc.engine.perf",
    "segvoc.runs": "segvoc.runs.directory",
    "segvoc.sweep": "segvoc.runs.sweep",
    "segvoc.seed_groups": "segvoc.runs.seed_groups",
    "segvoc.optuna_study": "segvoc.runs.optuna_study",
    "segvoc.model_card": "segvoc.runs.model_card",
    "segvoc.exporting": "segvoc.deploy.exporting",
    "segvoc.exported": "segvoc.deploy.exported",
}


def _moved_target(target: str) -> str:
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def upgrade_targets(node: Any) -> Any:
    """A stored config (plain containers) with each ``_target_`` of a moved module rewritten (``MOVED_MODULES``):
    configs stored by segvoc 0.3 and earlier build the same objects today."""
    if isinstance(node, dict):
        return {k: _moved_target(v) if k == "_target_" and isinstance(v, str) else upgrade_targets(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [upgrade_targets(v) for v in node]
    return node


# Lightning callbacks segvoc 0.5 replaced by its own subclasses (a stored config naming them is read as the new one)
REPLACED_TARGETS = {
    "pytorch_lightning.callbacks.ModelCheckpoint": "segvoc.engine.callbacks.RunCheckpoint",
    "pytorch_lightning.callbacks.EarlyStopping": "segvoc.engine.callbacks.ResumableEarlyStopping",
    "pytorch_lightning.loggers.CSVLogger": "segvoc.engine.trackers.ResumableCSVLogger",
}


def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config stored by an older segvoc, as today's code builds it: moved modules (``upgrade_targets``),
    replaced Lightning classes (``REPLACED_TARGETS``) and, for configs of 0.4 and earlier (whose trainer node has no
    ``_target_``), the callbacks that were then added in code, from ``conf/callbacks/default.yaml`` with the run's
    own paths."""
    cfg = _replaced(upgrade_targets(cfg))
    if isinstance(cfg.get("trainer"), dict) and "_target_" not in cfg["trainer"] and "callbacks" in cfg:
        from segvoc.config import CONF_DIR

        defaults = OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml")
        own = {k: cfg[k] for k in ("paths", "log_images", "perf") if k in cfg}
        scope = OmegaConf.merge({"log_images": 4, "perf": {"cudnn_benchmark": False}}, own, {"callbacks": defaults})
        added = OmegaConf.to_container(scope.callbacks, resolve=True)
        cfg["callbacks"] = {**{k: v for k, v in added.items() if k not in cfg["callbacks"]},
                            **(cfg["callbacks"] or {})}
    return cfg


def _replaced(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: REPLACED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else _replaced(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_replaced(v) for v in node]
    return node


def checkpoint_config(ckpt: dict[str, Any], source: str | Path = "checkpoint", trusted: Any = ()) -> DictConfig:
    """The run config stored in a checkpoint, once every ``_target_`` in it has passed the allowlist (rule D,
    ``segvoc.safety.trust``: this user's signed configs pass as typed; ``trusted``: prefixes from
    ``trusted_targets``), upgraded to today's layout (``upgrade_config``)."""
    hparams = ckpt["hyper_parameters"]
    check_config(hparams["cfg"], source, hparams.get(SIGNATURE_KEY), trusted or ())
    return OmegaConf.create(upgrade_config(hparams["cfg"]))


def load_state(task: SegmentationTask, state: dict[str, torch.Tensor], path: str | Path, cfg: DictConfig,
               check_only: bool = False) -> None:
    """``load_state_dict`` with a one-line error naming the checkpoint's model and the expected one."""
    own = task.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        found = choice(cfg, "model") or "?"
        classes = state.get("model.classifier.weight", torch.empty(0)).shape[:1]
        raise WeightsError(
            f"{path}: checkpoint does not fit model {task.model.__class__.__name__} with {task.num_classes} classes "
            f"(checkpoint: model {found}, classes {list(classes) or '?'}; {len(bad)} shape mismatches, "
            f"{len(missing)} missing keys); use the config the checkpoint was trained with"
        )
    if not check_only:
        task.load_state_dict(state, strict=True)
