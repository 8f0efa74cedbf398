"""A run directory: resuming the run it holds, checking it can be written, and writing its scores."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.config import carry_overrides
from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint
from segvoc.errors import ConfigError
from segvoc.evaluation.statistics import confusion_scores
from segvoc.utils import atomic_write, atomic_write_text, write_json

METRIC_KEYS = ("loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou", "boundary_miou",
               "per_class_boundary_iou", "ece", "calibration")

# what may change when a run is resumed: where and how it runs, not what it trains
RESUME_MAY_CHANGE = ("trainer", "callbacks", "logger", "perf", "infer", "paths", "data.root", "data.num_workers",
                     "data.pin_memory", "data.download", "data.decode_cache", "data.eval_batch_size", "traceback",
                     "log_images", "matmul_precision", "stats", "metrics")


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
    stored = checkpoint_config(read_checkpoint(last), last, cfg.get("trusted_targets") or ())
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


# what a mid-epoch loader position (batches per rank, in accumulation windows) is counted in
POSITION_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")


def check_resume_position(cfg: DictConfig, ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse, with one line, to continue a checkpoint saved in the middle of an epoch with another world size or
    accumulation: its loader position counts batches per rank, so the rest of the epoch would skip or repeat data
    (at an epoch end any value is fine: the next epoch starts from its beginning)."""
    states = ckpt.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    batches = int(states[0].get("batches", 0)) if states else 0
    if batches == 0:
        return
    stored = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])  # settings only: nothing is built from it
    for key in POSITION_KEYS:
        old, new = OmegaConf.select(stored, key, default=1), OmegaConf.select(cfg, key, default=1)
        if str(old) != str(new):
            raise ConfigError(
                f"{key}={new}: {path} was saved in the middle of epoch {states[0].get('epoch')} (batch {batches}) "
                f"with {key}={old}, and its position cannot move to another world size or accumulation; resume "
                f"with {key}={old} (any value is fine from an epoch-end checkpoint)")


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
RUN_OUTPUTS = ("checkpoints", "tb", "splits", "metrics.json", "confusion.json", "per_image_val.npz",
               "per_image_val.csv", "per_image_test.npz", "per_image_test.csv", "class_weights.json", "MODEL_CARD.md",
               "export", "FAILED.json", "PRUNED.json", "tracker.json", "csv", "wandb")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=")[0].replace("/", ".")


def _what_to_train(overrides: list[str]) -> set[str]:
    # launch-only keys do not make a run different
    return {o for o in overrides if _key(o).split(".")[0] not in ("hydra", "resume", "overwrite")}


def launch_differences(now: list[str], then: list[str]) -> tuple[list[str], list[str]]:
    """The overrides that change what is trained, typed ``now`` and not ``then`` (added) and the reverse."""
    return sorted(_what_to_train(now) - _what_to_train(then)), sorted(_what_to_train(then) - _what_to_train(now))


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a training run's checkpoints or scores."""
    return (run_dir / "metrics.json").is_file() or any((run_dir / "checkpoints").glob("*.ckpt"))


def resume_overrides(overrides: list[str], before: list[str] | None) -> list[str]:
    """What ``resume=auto`` carries onto a run it continues: the overrides typed now and not by the launch that
    started it; without a record of that launch, only those that may change on resume (``RESUME_MAY_CHANGE``)."""
    if before is not None:
        return [o for o in overrides if o not in before]
    return [o for o in overrides if _key(o) in RESUME_MAY_CHANGE
            or any(_key(o).startswith(a + ".") for a in RESUME_MAY_CHANGE)]


def ensure_writable(out: Path) -> None:
    """Fail before any training when the run directory cannot be written."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        # a name of its own (concurrent ranks or runs each probe their own file; none removes another's)
        with tempfile.NamedTemporaryFile(dir=out / "checkpoints", prefix=".write-test-", delete=True) as probe:
            probe.write(b"ok")
    except OSError as exc:
        raise not_writable(out, exc) from None


def not_writable(out: Path, exc: OSError) -> ConfigError:
    """The one-line error of a run directory that cannot be written."""
    return ConfigError(f"{out}: run directory is not writable ({exc.strerror}); set paths.output_root (or "
                       "SEGVOC_OUTPUTS) to a writable folder")


INTERVAL_KEYS = ("ci", "ci_method", "ci_na")  # what segvoc.evaluation.statistics.interval_fields adds


def split_entry(scores: dict[str, Any], epoch: int | None, class_names: Sequence[str]) -> dict[str, Any]:
    """The ``metrics.json`` entry of one scored split (``SegmentationTask.scores[split]``): the scores, their
    bootstrap intervals over images, the epoch of the checkpoint scored, and the class names the per-class lists
    follow (``classes``)."""
    return {**{k: scores[k] for k in (*METRIC_KEYS, *INTERVAL_KEYS) if k in scores}, "epoch": epoch,
            "classes": list(class_names)}


def per_image_csv(ids: list[str], confusion: np.ndarray) -> str:
    """``id, pixels, pixel_acc, miou`` per image; ``miou`` over the classes in that image's truth or prediction."""
    s = confusion_scores(confusion)
    lines = ["id,pixels,pixel_acc,miou"]
    def cell(v: float) -> str:  # an image whose pixels are all ignored has no score: an empty cell
        return "" if np.isnan(v) else f"{v:.6f}"

    for k, i in enumerate(ids):
        lines.append(f"{i},{int(confusion[k].sum())},{cell(s['pixel_acc'][k])},{cell(s['miou'][k])}")
    return "\n".join(lines) + "\n"


def write_per_image(out: Path, split: str, ids: list[str], rows: dict[str, np.ndarray]) -> None:
    """``per_image_<split>.npz`` (``ids``; ``confusion`` (N, C, C) int64, rows = truth; ``boundary`` (N, 2, C)
    boundary intersection/union; ``calibration`` (N, 3, 15) ECE bins) and ``per_image_<split>.csv``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, ids=np.array(ids, dtype=str), **rows)
    atomic_write(out / f"per_image_{split}.npz", lambda f: f.write(buf.getvalue()), binary=True)
    atomic_write_text(out / f"per_image_{split}.csv", per_image_csv(ids, rows["confusion"]))


def read_per_image(out: Path, split: str) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """What ``write_per_image`` wrote (None when the run has no such file)."""
    path = out / f"per_image_{split}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return [str(i) for i in data["ids"]], {k: data[k] for k in data.files if k != "ids"}


def write_scores(out: Path, scores: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> None:
    """The per-image files (``write_per_image``) and ``confusion.json`` (``{split: matrix}``) of the evaluated
    splits (``SegmentationTask.scores``), then ``metrics.json`` (``{split: entry}``)."""
    for split in metrics:
        write_per_image(out, split, scores[split]["ids"], scores[split]["per_image"])
    write_json(out / "confusion.json", {s: scores[s]["confusion"].tolist() for s in metrics})
    write_json(out / "metrics.json", metrics)
