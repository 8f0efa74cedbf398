"""A study that outlives the command (``hparams_search=optuna``), around Hydra's Optuna sweeper.

The study lives in SQLite in its sweep directory (``hydra.sweeper.storage``; any Optuna RDB URL works, e.g.
``postgresql://...`` for several nodes). This Hydra callback makes running the same command again continue the
study up to ``hydra.sweeper.n_trials`` trials in total; a trial left RUNNING by a killed sweep is marked failed and
its parameters are queued again. New jobs are numbered after the study's trials (``hydra.job.num`` plus an offset),
so trials of different launches never share a directory. At the end the best trial is written to
``optuna_best.yaml`` and printed. The search itself is Hydra's ``OptunaSweeper``, unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from segvoc.utils import atomic_write_text

log = logging.getLogger("segvoc.optuna")
BEST_FILE = "optuna_best.yaml"


def _study(config: DictConfig) -> Any:
    """The stored study named by the sweeper config, or None (no storage, or not created yet)."""
    import optuna

    storage, name = config.hydra.sweeper.get("storage"), config.hydra.sweeper.get("study_name")
    if not storage:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


class OptunaStudy(Callback):
    """Continue a stored study to ``n_trials`` in total; write and print the best trial at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna
        from hydra.core.hydra_config import HydraConfig

        # the study name and sweep dir may use ${hydra:...} (e.g. through ${name}): resolve them from this config
        HydraConfig.instance().set_config(config)
        if not config.hydra.sweeper.get("storage"):
            return
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # SQLite needs the folder
        study = _study(config)
        if study is None:
            return
        trials = study.trials
        stale = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for t in stale:  # its sweep was killed: fail it, and try its parameters again
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
        done = sum(t.state.is_finished() for t in trials)  # counted before the stale ones were failed
        total = int(config.hydra.sweeper.n_trials)
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"])
        numbered = subdir.replace("${hydra.job.num}", f"${{offset:${{hydra.job.num}},{len(trials)}}}")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweeper.n_trials = max(0, total - done)
            # jobs are composed again from these overrides (by any launcher): number them after the old trials
            config.hydra.overrides.hydra.append(f"hydra.sweep.subdir='{numbered}'")
        print(f"optuna study {study.study_name!r}: {done} of {total} trials done"
              + (f", {len(stale)} interrupted trial(s) queued again" if stale else "")
              + f"; running {config.hydra.sweeper.n_trials} more", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna

        study = _study(config)
        if study is None:
            return
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            return
        best = study.best_trial
        info = {"study_name": study.study_name, "storage": str(config.hydra.sweeper.storage),
                "direction": study.direction.name.lower(), "trials_complete": len(complete),
                "trials_total": len(study.trials), "best_trial": best.number, "best_value": best.value,
                "best_params": dict(best.params)}
        path = Path(str(config.hydra.sweep.dir)) / BEST_FILE
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(info)))
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"optuna best: trial {best.number}, value {best.value:.4f}: {params} -> {path}", flush=True)
