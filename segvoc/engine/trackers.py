"""Lightning's MLflow and CSV loggers, made to continue a run: a resumed training run logs into the MLflow run it
started (without logging a step twice or re-logging parameters that a resumed config states differently), and
appends to its ``metrics.csv``."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from typing import Any

from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from segvoc.utils import atomic_write

log = logging.getLogger("segvoc")


class ResumableMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that, given the ``run_id`` of an earlier launch, continues that run.

    - Metrics: a point at a step the run already holds for that key (logged by the earlier launch after its last
      checkpoint) is not logged again: the counterpart of TensorBoard's ``purge_step``, keeping the first point
      (MLflow cannot delete points). Each key's history therefore has one point per step.
    - Parameters: MLflow refuses to change a logged parameter; the resumed launch's config differs in where and how
      it runs (``ckpt_path``, ``trainer.*``), so only parameters the run does not hold yet are logged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._continued = kwargs.get("run_id") is not None
        self._last_steps: dict[str, int] | None = None  # per metric key, the last step the run holds

    @property
    def continued(self) -> bool:
        """Whether this logger continues an MLflow run started by an earlier launch."""
        return self._continued

    def _held_steps(self) -> dict[str, int]:
        if self._last_steps is None:
            client = self.experiment
            keys = client.get_run(self.run_id).data.metrics
            self._last_steps = {k: max((m.step for m in client.get_metric_history(self.run_id, k)), default=-1)
                                for k in keys}
            client.update_run(self.run_id, status="RUNNING")
        return self._last_steps

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._continued:
            held = self._held_steps()
            step_ = step or 0
            metrics = {k: v for k, v in metrics.items() if step_ > held.get(k, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._continued:
            from lightning_fabric.utilities.logger import _convert_params, _flatten_dict

            held = self.experiment.get_run(self.run_id).data.params
            params = {k: v for k, v in _flatten_dict(_convert_params(params)).items() if k not in held}
            if not params:
                return
        super().log_hyperparams(params)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without its deletion: an existing ``metrics.csv`` is continued (its header kept), and
    rows at or after ``purge_step`` (logged by an earlier launch after its last checkpoint; logged again now) are
    dropped first, as TensorBoard's ``purge_step`` does."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.hparams: dict[str, Any] = {}
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self._fs = get_filesystem(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._fs.makedirs(log_dir, exist_ok=True)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = list(reader.fieldnames or [])
                rows = [r for r in reader if purge_step is None or not r.get("step") or int(r["step"]) < purge_step]
            def write(f: Any) -> None:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)

            atomic_write(self.metrics_file_path, write)  # a crash here keeps the old history, not half of it


class ResumableCSVLogger(CSVLogger):
    """``logger=csv``: Lightning's ``CSVLogger``, whose history a resumed run continues (``version=""`` would delete
    ``metrics.csv`` when the logger starts); ``purge_step`` as ``TensorBoardLogger``'s."""

    def __init__(self, *args: Any, purge_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._purge_step = purge_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._purge_step)
        return self._experiment
