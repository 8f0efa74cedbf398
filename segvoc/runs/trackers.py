"""Experiment trackers (``logger=mlflow``, ``logger=wandb``; ``logger=[tensorboard,mlflow]`` for both) tied to the
run directory both ways.

- Before training: an ``http(s)://`` MLflow URI that does not answer is a one-line error (``check_trackers``); the
  tracker runs are named and tagged from the run directory (``logger_kwargs``): the seed group (the config minus
  ``seed``, as ``segvoc.report`` groups runs), the experiment preset, the git commit and the run directory.
- A multirun puts one tracker run per job into one MLflow experiment / W&B project named after the sweep's directory;
  a single run uses its ``name``.
- ``tracker.json`` in the run directory records each tracker run's id (``record_trackers``), and so does
  ``MODEL_CARD.md``; ``resume=`` (``resume=auto``, a submitit requeue) continues those runs.
- At the end (``finish_trackers``): the final val/test scores, ``MODEL_CARD.md``, ``metrics.json``,
  ``class_weights.json``, the test confusion-matrix figure and (``logger.log_checkpoints``) checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segvoc.config import stored_overrides
from segvoc.engine.builders import logger_nodes
from segvoc.errors import ConfigError, TrackerError
from segvoc.extras import require
from segvoc.runs.model_card import git_commit
from segvoc.runs.seed_groups import config_without_seed
from segvoc.utils import write_json

log = logging.getLogger("segvoc.trackers")
TRACKER_FILE = "tracker.json"
CHECKPOINT_CHOICES = ("none", "best", "all")
TRACKERS = ("mlflow", "wandb")  # logger keys whose package is an extra of the same name
ARTIFACTS = ("MODEL_CARD.md", "metrics.json", "confusion.json", "class_weights.json", TRACKER_FILE)


def read_tracker_file(run_dir: Path) -> dict[str, Any]:
    """``tracker.json`` of a run directory (``{}`` when the run logged to no tracker)."""
    path = Path(run_dir) / TRACKER_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_trackers(cfg: DictConfig) -> None:
    """Fail before training, in one line, when a tracker's extra is not installed (``logger=mlflow`` needs the
    mlflow extra, ``logger=wandb`` the wandb extra), when an ``http(s)://`` MLflow tracking URI does not answer, or
    when ``logger.log_checkpoints`` is not one of ``none|best|all``."""
    nodes = logger_nodes(cfg)
    for tracker in TRACKERS:
        if tracker in nodes:
            require(tracker, f"logger={tracker}")
    choice = str((cfg.get("logger") or {}).get("log_checkpoints", "none"))
    if choice not in CHECKPOINT_CHOICES:
        raise ConfigError(f"logger.log_checkpoints={choice}: choose one of {'|'.join(CHECKPOINT_CHOICES)}")
    uri = str((nodes.get("mlflow") or {}).get("tracking_uri") or "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            pass
    except urllib.error.HTTPError:
        return  # something answers (an auth proxy, an older server without /health): MLflow will tell the rest
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackerError(f"logger.mlflow.tracking_uri={uri}: no MLflow server answers there ({reason}); start it "
                           "(mlflow server --host HOST --port PORT), fix the URI, or log to a local database with "
                           "logger.mlflow.tracking_uri=sqlite:///path/to/mlflow.db") from None


def seed_group(run_dir: Path) -> str:
    """A short id shared by the runs whose configs differ only in ``seed`` (``segvoc.runs.seed_groups``)."""
    return hashlib.sha256(config_without_seed(run_dir).encode()).hexdigest()[:12]


def _preset(run_dir: Path) -> str:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return "none"
    choices = OmegaConf.load(hydra_file).hydra.runtime.get("choices") or {}
    return str(choices.get("experiment") or "none")


def tracker_tags(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """What ties a tracker run to its files: seed group, experiment preset, git commit, run directory, and the
    overrides that set the run apart (``seed=`` and ``hydra.*`` left out)."""
    overrides = [o for o in stored_overrides(run_dir) or [] if not o.startswith(("seed=", "hydra.", "hydra/"))]
    return {"seed_group": seed_group(run_dir), "experiment": _preset(run_dir), "seed": str(cfg.get("seed")),
            "git_commit": git_commit(Path(__file__).resolve().parents[2]) or "unknown", "run_dir": str(run_dir),
            "overrides": " ".join(overrides)[:4000] or "none"}


def group_name(cfg: DictConfig) -> str:
    """The MLflow experiment / W&B project of a run: the sweep directory's name for a job of a multirun (every job
    of the sweep shares it), else the run's ``name``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(str(HydraConfig.get().sweep.dir)).name
    return str(cfg.get("name") or "segvoc")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def logger_kwargs(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per logger key, what ``build_trainer`` adds to its config: names, tags and, when this launch continues the
    run in ``run_dir`` (``ckpt_path`` set and a ``tracker.json`` there), the tracker run to continue."""
    nodes = logger_nodes(cfg)
    recorded = read_tracker_file(run_dir) if cfg.get("ckpt_path") else {}
    tags = tracker_tags(cfg, run_dir) if {"mlflow", "wandb"} & set(nodes) else {}
    out: dict[str, dict[str, Any]] = {}
    if "mlflow" in nodes:
        node = nodes["mlflow"]
        kw: dict[str, Any] = {"experiment_name": node.get("experiment_name") or group_name(cfg),
                              "run_name": node.get("run_name") or run_dir.name,
                              "tags": {**tags, **(node.get("tags") or {})}}
        uri = str(node.get("tracking_uri") or "")
        if not node.get("artifact_location") and uri.startswith("sqlite:"):  # else MLflow uses ./mlruns in the cwd
            kw["artifact_location"] = str(Path(str(cfg.paths.output_root)) / "mlartifacts")
        if recorded.get("mlflow", {}).get("run_id"):
            kw["run_id"] = recorded["mlflow"]["run_id"]
        out["mlflow"] = kw
    if "wandb" in nodes:
        node = nodes["wandb"]
        mode = node.get("mode") or ("online" if _wandb_has_key() else "offline")
        kw = {"project": node.get("project") or group_name(cfg), "name": node.get("name") or run_dir.name,
              "mode": mode, "group": tags["seed_group"], "reinit": "finish_previous",  # jobs of an in-process sweep
              "tags": [f"{k}:{tags[k]}"[:64] for k in ("seed_group", "experiment", "seed", "git_commit")]
              + list(node.get("tags") or []),
              "config": {"segvoc_tracking": tags}}
        if recorded.get("wandb", {}).get("id"):
            kw |= {"id": recorded["wandb"]["id"], "resume": "allow"}
        out["wandb"] = kw
    return out


def record_trackers(run_dir: Path, loggers: list[Any]) -> dict[str, Any]:
    """Write ``tracker.json`` (each tracker run's id, where it lives) into ``run_dir``; rank 0 calls this before
    training, so a run killed at any point can be continued. Returns what was written (``{}``: no tracker)."""
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    info: dict[str, Any] = {}
    for lg in loggers:
        if isinstance(lg, MLFlowLogger):
            info["mlflow"] = {"run_id": lg.run_id, "experiment_id": lg.experiment_id,
                              "experiment_name": lg._experiment_name, "tracking_uri": lg._tracking_uri}
        elif isinstance(lg, WandbLogger):
            run = lg.experiment
            offline = bool(run.settings._offline)
            info["wandb"] = {"id": run.id, "project": run.project, "entity": run.entity or None,
                             "mode": "offline" if offline else "online", "dir": str(Path(run.dir).parent),
                             "url": None if offline else run.url}
    if info:
        write_json(run_dir / TRACKER_FILE, info)
    return info


def _final_scalars(metrics: dict[str, Any], class_names: list[str]) -> dict[str, float]:
    """The scored splits as scalars: ``test/<metric>`` and ``test_iou/<class>`` (names as logged for val during
    training), and the scored checkpoint's val scores as ``best_val/<metric>`` (``val/*`` keeps one point per
    epoch)."""
    out: dict[str, float] = {}
    for split, prefix in (("val", "best_val"), ("test", "test")):
        scores = metrics.get(split) or {}
        for key in ("miou", "pixel_acc", "mean_class_acc", "loss"):
            if scores.get(key) is not None:
                out[f"{prefix}/{key}"] = float(scores[key])
        iou_prefix = "best_val_iou" if split == "val" else "test_iou"
        for name, iou in zip(class_names, scores.get("per_class_iou") or [], strict=False):
            if iou is not None:
                out[f"{iou_prefix}/{name}"] = float(iou)
    return out


def finish_trackers(loggers: list[Any], run_dir: Path, cfg: DictConfig, metrics: dict[str, Any],
                    hparams: dict[str, Any], class_names: list[str], step: int,
                    confusion: Any = None) -> None:
    """End-of-run logging on every logger (rank 0): final scores, TensorBoard's HPARAMS entry, artifacts and
    checkpoints for MLflow / W&B, then ``finalize``."""
    from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    scalars = _final_scalars(metrics, class_names)
    ckpts = _checkpoints(run_dir, str((cfg.get("logger") or {}).get("log_checkpoints", "none")))
    files = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
    for lg in loggers:
        lg.log_metrics(scalars, step=step)
        if isinstance(lg, TensorBoardLogger):  # the HPARAMS tab: config + result
            lg.log_hyperparams(hparams, {"hp/val_miou": metrics["val"]["miou"],
                                         "hp/test_miou": metrics["test"]["miou"]})
        elif isinstance(lg, MLFlowLogger):
            client, run_id = lg.experiment, lg.run_id
            for path in files:
                client.log_artifact(run_id, str(path))
            for path in ckpts:
                client.log_artifact(run_id, str(path), "checkpoints")
            if confusion is not None:
                client.log_figure(run_id, _figure(confusion, class_names), "figures/confusion_test.png")
        elif isinstance(lg, WandbLogger):
            run = lg.experiment
            for path in [*files, *ckpts]:
                run.save(str(path), base_path=str(run_dir), policy="now")
            if confusion is not None:
                import wandb

                run.log({"figures/confusion_test": wandb.Image(_figure(confusion, class_names))})
            if run.settings._offline:
                print(f"wandb: offline run, files in {Path(run.dir).parent}; upload with: wandb sync "
                      f"{Path(run.dir).parent}", flush=True)
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()  # writes the summary; the next job of a sweep opens its own run


def _figure(confusion: Any, class_names: list[str]) -> Any:
    import numpy as np

    from segvoc.evaluation.figures import confusion_figure

    return confusion_figure(np.asarray(confusion), class_names, title="test confusion matrix")


def _checkpoints(run_dir: Path, choice: str) -> list[Path]:
    folder = run_dir / "checkpoints"
    if choice == "best":
        return [p for p in [folder / "best.ckpt"] if p.is_file()]
    if choice == "all":
        return sorted(folder.glob("*.ckpt"))
    return []


def tracker_lines(run_dir: Path) -> list[str]:
    """Markdown lines for the model card: where each tracker run of ``run_dir`` is (from ``tracker.json``)."""
    info = read_tracker_file(run_dir)
    lines = []
    if "mlflow" in info:
        m = info["mlflow"]
        lines.append(f"- MLflow run `{m['run_id']}` in experiment `{m['experiment_name']}` at `{m['tracking_uri']}`")
    if "wandb" in info:
        w = info["wandb"]
        lines.append(f"- W&B run `{w['id']}` in project `{w['project']}` ({w['mode']}"
                     + (f", {w['url']}" if w.get("url") else f", files in `{w['dir']}`") + ")")
    return lines

