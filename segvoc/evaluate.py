"""``python -m segvoc.evaluate ckpt=<path> [split=test] [tta=none|flip|ms_flip]``: score a checkpoint.

``ckpt`` may also be a file written by ``segvoc.export`` (``.onnx``, TorchScript ``.pt``): it is scored with the
same loader and metric code, so its mIoU can be compared with the checkpoint's.

Runs the same evaluation loop as training (full-resolution images, dataset-level confusion matrix), writes
``metrics.json`` (``{split: {loss, miou, pixel_acc, mean_class_acc, per_class_iou, epoch}}``), ``confusion.json``
and ``per_class_iou.md`` into its run directory, and prints the per-class table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.app import run_app
from segvoc.config import carry_overrides, command_line_overrides  # also registers resolvers
from segvoc.deploy.exported import export_format, load_any_task, read_metadata
from segvoc.engine.builders import build_datamodule, build_trainer
from segvoc.engine.checkpoint import read_checkpoint
from segvoc.errors import ConfigError
from segvoc.evaluation.inference import InferenceConfig
from segvoc.evaluation.tables import per_class_table
from segvoc.runs.directory import split_scores, write_scores
from segvoc.tables import fmt_ci
from segvoc.utils import atomic_write_text

SCORE_NAMES = (("miou", "mIoU"), ("pixel_acc", "pixel acc"), ("mean_class_acc", "mean class acc"),
               ("boundary_miou", "boundary mIoU"))

log = logging.getLogger("segvoc.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on ``cfg.split``; returns (and writes) ``{split: scores}``."""
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split={cfg.split!r}: use val or test")
    out = Path(cfg.paths.output_dir)
    inference = InferenceConfig(**OmegaConf.to_container(cfg.infer, resolve=True))
    task, run_cfg = load_any_task(cfg.ckpt, inference)
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
    task.set_boundary_dilation_ratio(cfg.metrics.boundary_dilation_ratio)
    trainer = build_trainer(cfg, evaluation=True)
    run = trainer.validate if cfg.split == "val" else trainer.test
    run(task, datamodule=dm, verbose=False)
    metrics = {cfg.split: split_scores(task, cfg.split, epoch, cfg.stats)}
    if trainer.is_global_zero:
        write_scores(out, task, metrics)
        table = per_class_table(task.scores[cfg.split], title=f"{cfg.split} ({Path(cfg.ckpt)}, tta={cfg.tta})")
        atomic_write_text(out / "per_class_iou.md", table)
        print(table, flush=True)
        m = metrics[cfg.split]
        print(f"{cfg.split} ({m['ci_method']}): "
              + "  ".join(f"{name} {fmt_ci(m[key], m['ci'].get(key), m['ci_na'].get(key))}"
                          for key, name in SCORE_NAMES)
              + f"  ECE {m['ece']:.4f}", flush=True)
        log.info("%s mIoU %.4f pixel acc %.4f -> %s", cfg.split, m["miou"], m["pixel_acc"], out)
    return metrics


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app(evaluate, cfg)


if __name__ == "__main__":
    main()
