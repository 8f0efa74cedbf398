"""A study that outlives the command (``hparams_search=optuna``), around segvoc's Optuna sweeper
(``hydra_plugins/segvoc_optuna``).

The study lives in SQLite in its sweep directory (``hydra.sweeper.storage``; any Optuna RDB URL works, e.g.
``postgresql://...`` for several nodes, and ``journal:<file>`` for a shared file system without a database server).
This Hydra callback makes running the same command again continue the study up to ``hydra.sweeper.n_trials``
trials in total; a trial left RUNNING by a killed sweep (its sweeper process, on this host, is gone) is marked failed
and its parameters are queued again. A
study whose definition (overrides and search space) differs from this launch's is refused in one line. Each job is
numbered by its trial (``hydra.job.num`` = the trial's number, set by the sweeper), so trials of different launches,
or of several processes sharing one study, never share a directory. At the end the best trial is written to
``optuna_best.yaml`` and printed.

``OptunaPruning`` is the Lightning callback that reports ``val/<metric>`` to the trial each epoch and stops a trial
the study's pruner prunes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from segvoc.config import search_definition
from segvoc.extras import require
from segvoc.utils import atomic_write_text

log = logging.getLogger("segvoc.optuna")
BEST_FILE = "optuna_best.yaml"
# the job environment variable (set by the sweeper through hydra.job.env_set) naming the trial a job runs
TRIAL_ENV = "SEGVOC_OPTUNA_TRIAL"


OWNER_ATTR = "segvoc_sweeper"  # trial user attribute: "<host>:<pid>" of the sweeper process that asked for it


def owner() -> str:
    """This process as a trial owner: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_stale(trial: Any) -> bool:
    """Whether a RUNNING trial was left by a sweeper process that is gone: one of this host whose pid no longer
    runs. A trial of another host (several nodes sharing a study) or of a live process is not touched."""
    host, _, pid = str(trial.user_attrs.get(OWNER_ATTR, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return not host  # trials without an owner (older segvoc): stale, as before
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class PrunedRun(Exception):
    """The study's pruner stopped this trial (recorded as pruned, not failed)."""


def open_storage(url: str | None) -> Any:
    """An Optuna storage from ``hydra.sweeper.storage``: ``journal:<file>`` (Optuna's journal file storage) or an
    RDB URL (``sqlite:///...``, ``postgresql://...``); None: no storage (in memory)."""
    if not url:
        return None
    if str(url).startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(str(url)[len("journal:"):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return str(url)


def refusal(name: str, stored: dict[str, Any], now: dict[str, Any]) -> str:
    """The one-line refusal to continue study ``name`` with another definition."""
    diff = [f"{k}: study {stored.get(k)} != now {now.get(k)}" for k in ("overrides", "params")
            if stored.get(k) != now.get(k)]
    return (f"error: optuna study {name!r} was defined by other overrides or another search space "
            f"({'; '.join(diff)}); run it with its own definition, or start another study with "
            "hydra.sweeper.study_name=<new>")


def _study(config: DictConfig) -> Any:
    """The stored study named by the sweeper config, or None (no storage, or not created yet)."""
    import optuna

    storage, name = config.hydra.sweeper.get("storage"), config.hydra.sweeper.get("study_name")
    if not storage:
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        return None


class OptunaStudy(Callback):
    """Continue a stored study to ``n_trials`` in total; write and print the best trial at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        optuna = require("sweep", "hparams_search=optuna")

        # the study name and sweep dir may use ${hydra:...} (e.g. through ${name}): resolve them from this config
        HydraConfig.instance().set_config(config)
        if not config.hydra.sweeper.get("storage"):
            return
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # SQLite needs the folder
        study = _study(config)
        if study is None:
            return
        stored = study.user_attrs.get("segvoc_definition")
        now = json.loads(json.dumps(search_definition(config.hydra.overrides.task, config.hydra.sweeper.params)))
        if stored is not None and stored != now:
            print(refusal(study.study_name, stored, now), file=sys.stderr, flush=True)
            raise SystemExit(2)
        trials = study.trials
        stale = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and is_stale(t)]
        for t in stale:  # its sweep was killed: fail it, and try its parameters again
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
        done = sum(t.state.is_finished() for t in trials)  # counted before the stale ones were failed
        total = int(config.hydra.sweeper.n_trials)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweeper.n_trials = max(0, total - done)
        print(f"optuna study {study.study_name!r}: {done} of {total} trials done"
              + (f", {len(stale)} interrupted trial(s) queued again" if stale else "")
              + f"; running {config.hydra.sweeper.n_trials} more", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna

        study = _study(config)
        if study is None:
            return
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
        if not complete:
            return
        best = study.best_trial
        info = {"study_name": study.study_name, "storage": str(config.hydra.sweeper.storage),
                "direction": study.direction.name.lower(), "trials_complete": len(complete),
                "trials_pruned": pruned, "trials_total": len(study.trials), "best_trial": best.number,
                "best_value": best.value,
                "best_params": dict(best.params)}
        path = Path(str(config.hydra.sweep.dir)) / BEST_FILE
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(info)))
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"optuna best: trial {best.number}, value {best.value:.4f}: {params} -> {path}", flush=True)


class OptunaPruning(pl.Callback):
    """Report ``monitor`` to the Optuna trial this job runs after every validation epoch, and stop the job with
    ``PrunedRun`` when the study's pruner says so. A no-op outside a ``hparams_search=optuna`` trial (no
    ``SEGVOC_OPTUNA_TRIAL`` in the environment). Rank 0 decides; the decision is broadcast to every rank."""

    def __init__(self, monitor: str = "val/miou") -> None:
        self.monitor = monitor
        self._trial: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        number = os.environ.get(TRIAL_ENV)
        if stage != "fit" or number is None or not trainer.is_global_zero:
            return
        import optuna
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import instantiate

        pruner_cfg = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
        study = optuna.load_study(study_name=os.environ["SEGVOC_OPTUNA_STUDY"],
                                  storage=open_storage(os.environ["SEGVOC_OPTUNA_STORAGE"]),
                                  pruner=instantiate(pruner_cfg) if pruner_cfg else None)
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == int(number))
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (not on_validation_epoch_end: callbacks run it before the task logs this epoch's val/miou)
        if trainer.sanity_checking or os.environ.get(TRIAL_ENV) is None:
            return
        prune = False
        if self._trial is not None and self.monitor in trainer.callback_metrics:
            self._trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.current_epoch)
            prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            raise PrunedRun(f"pruned by the study's pruner at epoch {trainer.current_epoch} "
                            f"({self.monitor}={float(trainer.callback_metrics.get(self.monitor, float('nan'))):.4f})")
