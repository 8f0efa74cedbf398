"""A run directory: resuming the run it holds, checking it can be written, and writing its scores."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.config import carry_overrides, stored_overrides
from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint
from segvoc.engine.task import SegmentationTask
from segvoc.errors import ConfigError
from segvoc.utils import write_json

METRIC_KEYS = ("loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou")

# what may change when a run is resumed: where and how it runs, not what it trains
RESUME_MAY_CHANGE = ("trainer", "callbacks", "logger", "perf", "infer", "paths", "data.root", "data.num_workers",
                     "data.pin_memory", "data.download", "data.decode_cache", "data.eval_batch_size", "traceback",
                     "log_images", "matmul_precision")


def resume_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config of the run in ``cfg.resume`` (stored in its last checkpoint), set to continue from it.

    What the user typed with ``resume=`` is applied on top when it only changes where and how the run goes on
    (``trainer=ddp trainer.devices=4``, ``trainer.max_epochs=50``, ``data.root=...``); anything that would change
    what is trained (``model=``, ``loss.*``, ``data.batch_size``, ...) is refused with one line naming the key.
    ``overrides``: the overrides to check and apply (default: all typed on the command line).
    """
    run_dir = Path(cfg.resume).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise ConfigError(f"resume={run_dir}: no checkpoints/last.ckpt there; pass the run directory of a segvoc run")
    stored = checkpoint_config(read_checkpoint(last))
    moved_from = str(stored.paths.output_dir)
    if moved_from != str(run_dir):  # the run directory was moved or copied: its paths follow it
        stored = OmegaConf.create(_rebase(OmegaConf.to_container(stored), moved_from, str(run_dir)))
    run_cfg = carry_overrides(stored, cfg, RESUME_MAY_CHANGE,
                              "a resumed run keeps what it was trained with; start a new run (without resume=)",
                              overrides)
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = str(run_dir)
        run_cfg.ckpt_path = str(last)
        run_cfg.resume = None
    return run_cfg


def _rebase(node: Any, old: str, new: str) -> Any:
    """``node`` with every path inside ``old`` (a run directory) moved under ``new``."""
    if isinstance(node, dict):
        return {k: _rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new + node[len(old):]
    return node


# what a training run writes into its directory (besides Hydra's .hydra*/ and <job>.log)
RUN_OUTPUTS = ("checkpoints", "tb", "splits", "metrics.json", "confusion.json", "class_weights.json", "MODEL_CARD.md",
               "export", "FAILED.json", "PRUNED.json", "tracker.json", "csv", "wandb")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=")[0].replace("/", ".")


def _what_to_train(overrides: list[str]) -> set[str]:
    # launch-only keys do not make a run different
    return {o for o in overrides if _key(o).split(".")[0] not in ("hydra", "resume", "overwrite")}


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a training run's checkpoints or scores."""
    return (run_dir / "metrics.json").is_file() or any((run_dir / "checkpoints").glob("*.ckpt"))


def clear_run(run_dir: Path) -> None:
    """Delete what an earlier run left in ``run_dir`` (``overwrite=true``); this launch's config becomes
    ``.hydra/``."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if (run_dir / ".hydra_resume").is_dir():  # written by this launch (config_subdir saw the old .hydra/)
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        (run_dir / ".hydra_resume").rename(run_dir / ".hydra")


@dataclass
class AutoResume:
    """What ``resume=auto`` decided for an output directory."""

    action: str                              # start | resume | finished
    cfg: DictConfig
    metrics: dict[str, Any] | None = None    # the finished run's metrics.json


def auto_resume(cfg: DictConfig, overrides: list[str]) -> AutoResume:
    """``resume=auto`` in ``cfg.paths.output_dir``: resume an unfinished run (``checkpoints/last.ckpt``, no
    ``metrics.json``), report a finished one, or start afresh. A run launched with other overrides than
    ``overrides`` (what would be trained differs) is never resumed or skipped: that is a ``ConfigError``."""
    out = Path(cfg.paths.output_dir)
    before = stored_overrides(out)
    finished = (out / "metrics.json").is_file()
    last = out / "checkpoints" / "last.ckpt"
    if before is not None and (finished or last.is_file()):
        added = _what_to_train(overrides) - _what_to_train(before)
        removed = _what_to_train(before) - _what_to_train(overrides)
        if added or removed:
            raise ConfigError(f"{out}: holds a run launched with other overrides (now {sorted(added)}, then "
                              f"{sorted(removed)}); use another hydra.sweep.dir / hydra.run.dir, or overwrite=true")
    if finished:
        return AutoResume("finished", cfg, json.loads((out / "metrics.json").read_text()))
    if last.is_file():
        with open_dict(cfg):
            cfg.resume = str(out)
        if before is not None:  # what differs from the launch that started the run
            new = [o for o in overrides if o not in before]
        else:  # no record of that launch: carry only what may change on resume
            new = [o for o in overrides if _key(o) in RESUME_MAY_CHANGE
                   or any(_key(o).startswith(a + ".") for a in RESUME_MAY_CHANGE)]
        return AutoResume("resume", resume_config(cfg, new))
    clear_run(out)  # at most a start that never reached a checkpoint
    with open_dict(cfg):
        cfg.resume = None
    return AutoResume("start", cfg)


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
