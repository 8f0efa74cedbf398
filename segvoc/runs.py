"""A run directory: resuming the run it holds, checking it can be written, and writing its scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from segvoc.checkpoint import checkpoint_config, read_checkpoint
from segvoc.config import carry_overrides
from segvoc.errors import ConfigError
from segvoc.task import SegmentationTask
from segvoc.utils import write_json

METRIC_KEYS = ("loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou")

# what may change when a run is resumed: where and how it runs, not what it trains
RESUME_MAY_CHANGE = ("trainer", "callbacks", "logger", "perf", "infer", "paths", "data.root", "data.num_workers",
                     "data.pin_memory", "data.download", "traceback", "log_images", "matmul_precision")


def resume_config(cfg: DictConfig) -> DictConfig:
    """The config of the run in ``cfg.resume`` (stored in its last checkpoint), set to continue from it.

    What the user typed with ``resume=`` is applied on top when it only changes where and how the run goes on
    (``trainer=ddp trainer.devices=4``, ``trainer.max_epochs=50``, ``data.root=...``); anything that would change
    what is trained (``model=``, ``loss.*``, ``data.batch_size``, ...) is refused with one line naming the key.
    """
    run_dir = Path(cfg.resume).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume={run_dir}: no checkpoints/last.ckpt there; pass the run directory of a segvoc run")
    run_cfg = carry_overrides(checkpoint_config(read_checkpoint(last)), cfg, RESUME_MAY_CHANGE,
                              "a resumed run keeps what it was trained with; start a new run (without resume=)")
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = str(run_dir)
        run_cfg.ckpt_path = str(last)
        run_cfg.resume = None
    return run_cfg


def ensure_writable(out: Path) -> None:
    """Fail before any training when the run directory cannot be written."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / "checkpoints" / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{out}: run directory is not writable ({exc.strerror}); "
                          "set paths.output_root (or SEGVOC_OUTPUTS) to a writable folder") from None


def split_scores(task: SegmentationTask, split: str, epoch: int | None) -> dict[str, Any]:
    """The ``metrics.json`` entry of one split, from the task's last evaluation of it."""
    scores = task.scores[split]
    return {**{k: scores[k] for k in METRIC_KEYS}, "epoch": epoch}


def write_scores(out: Path, task: SegmentationTask, metrics: dict[str, Any]) -> None:
    """``metrics.json`` (``{split: scores}``) and ``confusion.json`` (``{split: matrix}``) of the evaluated splits."""
    write_json(out / "metrics.json", metrics)
    write_json(out / "confusion.json", {s: task.scores[s]["confusion"].tolist() for s in metrics})
