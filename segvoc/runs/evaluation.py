"""Scoring a stored model (a checkpoint or an exported file) on a split of its own data: what ``segvoc.evaluate``
runs. The data keys typed with the command (``data.root=``, ``data.num_workers=``...) replace the stored run's, with
the meaning they have in ``segvoc.train``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.config import carry_overrides, command_line_overrides
from segvoc.deploy.exported import export_format, load_any_task, read_metadata
from segvoc.engine.builders import build_datamodule
from segvoc.engine.checkpoint import read_checkpoint
from segvoc.engine.task import SegmentationTask
from segvoc.evaluation.inference import InferenceConfig
from segvoc.evaluation.tables import per_class_table
from segvoc.tables import fmt_ci

log = logging.getLogger("segvoc.evaluate")
SCORE_NAMES = (("miou", "mIoU"), ("pixel_acc", "pixel acc"), ("mean_class_acc", "mean class acc"),
               ("boundary_miou", "boundary mIoU"))


def prepare_evaluation(cfg: DictConfig) -> tuple[SegmentationTask, Any, int | None]:
    """The task of ``cfg.ckpt`` (its config checked against the allowlist), its data module set up for testing,
    and the epoch it was saved at; ``cfg.stats``, ``cfg.metrics`` and ``cfg.infer`` are this command's."""
    inference = InferenceConfig(**OmegaConf.to_container(cfg.infer, resolve=True))
    task, run_cfg = load_any_task(cfg.ckpt, inference, cfg.get("trusted_targets") or ())
    exported = export_format(cfg.ckpt) is not None
    epoch = read_metadata(cfg.ckpt).get("epoch") if exported else read_checkpoint(cfg.ckpt).get("epoch")
    typed = command_line_overrides()
    run_cfg = carry_overrides(run_cfg, cfg, ("data",), "evaluate uses the checkpoint's model and config",
                              [o for o in typed if o.lstrip("+~").startswith("data")])
    if any(o.lstrip("+").startswith(("data.root=", "data=")) for o in typed):
        with open_dict(run_cfg):
            run_cfg.data.synthetic = None  # score the given tree as it is, never regenerate it
    if not exported:
        carry_precision(cfg, run_cfg, typed)
    dm = build_datamodule(run_cfg)
    dm.prepare_data()
    dm.setup("test")
    for metric in task.boundary.values():
        metric.ratio = float(cfg.metrics.boundary_dilation_ratio)
    task.stats = OmegaConf.to_container(cfg.stats, resolve=True)
    return task, dm, epoch


def carry_precision(cfg: DictConfig, run_cfg: DictConfig, typed: list[str]) -> None:
    """Score as the run trained: its ``trainer.precision`` (a bf16-mixed run scored in fp32 cannot reproduce its
    own test scores), unless ``trainer.precision=`` was typed."""
    stored = OmegaConf.select(run_cfg, "trainer.precision")
    if stored is None or any(o.lstrip("+").startswith("trainer.precision=") for o in typed):
        return
    if str(stored) != str(cfg.trainer.precision):
        log.info("trainer.precision=%s, as the run was trained (type trainer.precision= to change it)", stored)
    with open_dict(cfg):
        cfg.trainer.precision = stored


def evaluation_text(cfg: DictConfig, task: SegmentationTask, entry: dict[str, Any]) -> tuple[str, str]:
    """The per-class table (``per_class_iou.md``) and the line of summary scores with their intervals."""
    split = cfg.split
    table = per_class_table(task.scores[split], task.class_names, title=f"{split} ({Path(cfg.ckpt)}, tta={cfg.tta})")
    ci, na = entry.get("ci") or {}, entry.get("ci_na") or {}
    line = (f"{split} ({entry.get('ci_method')}): "
            + "  ".join(f"{name} {fmt_ci(entry[key], ci.get(key), na.get(key))}" for key, name in SCORE_NAMES)
            + f"  ECE {entry['ece']:.4f}")
    return table, line
