"""Multirun bookkeeping: failed jobs are recorded instead of ending the sweep, and a summary names them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segvoc.config import stored_overrides
from segvoc.errors import ConfigError
from segvoc.runs.directory import holds_run, launch_differences
from segvoc.utils import write_json

log = logging.getLogger("segvoc.runs.sweep")
FAILED_MARKER = "FAILED.json"
PRUNED_MARKER = "PRUNED.json"  # an Optuna trial its pruner stopped: not a failure


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Mark a sweep job's directory as failed, with the one-line reason."""
    write_json(run_dir / FAILED_MARKER, {"error": f"{type(exc).__name__}: {exc}"})


def clear_failure(run_dir: Path) -> None:
    """Forget an earlier attempt's failure: the job is running again (its new outcome replaces it)."""
    (run_dir / FAILED_MARKER).unlink(missing_ok=True)


def record_pruned(run_dir: Path, exc: BaseException) -> None:
    """Mark a sweep job's directory as pruned (an Optuna trial stopped early by the study's pruner)."""
    write_json(run_dir / PRUNED_MARKER, {"pruned": str(exc)})


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep, old and new: every folder holding a ``.hydra/`` (also in per-launch
    subfolders, as Optuna studies use), or the failure record of a job refused before it wrote one, outside hidden
    folders such as ``.submitit/``."""
    found = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for name in (FAILED_MARKER, PRUNED_MARKER) for p in sweep_dir.rglob(name)}
    return sorted(d for d in found if d != sweep_dir
                  and not any(part.startswith(".") for part in d.relative_to(sweep_dir).parts))


def _running_elsewhere(job: Path) -> bool:
    """Whether ``job`` is an Optuna trial that another live sweeper process is running (several processes sharing
    one study, e.g. a journal file): not a failure of this sweep."""
    hydra_dir = job / ".hydra"
    if not (hydra_dir / "overrides.yaml").is_file():
        # Hydra writes config.yaml, hydra.yaml, then overrides.yaml, all before the job starts: a launch caught
        # half-way is one another process is starting (this process's own jobs have all returned)
        return True
    try:
        env = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.get("env_set") or {}
    except Exception:  # noqa: BLE001 - unreadable: not one of this sweeper's trials
        return False
    if "SEGVOC_OPTUNA_TRIAL" not in env:
        return False
    import optuna

    from segvoc.runs.optuna_study import is_stale, open_storage

    try:
        study = optuna.load_study(study_name=str(env["SEGVOC_OPTUNA_STUDY"]),
                                  storage=open_storage(str(env["SEGVOC_OPTUNA_STORAGE"])))
    except (KeyError, ValueError):
        return False
    number = int(env["SEGVOC_OPTUNA_TRIAL"])
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    return trial is not None and trial.state == optuna.trial.TrialState.RUNNING and not is_stale(trial)


def summarize(sweep_dir: Path) -> dict[str, Any]:
    """``{"ok": [...], "pruned": [...], "running": [...], "failed": {job: reason}}`` over the job folders of a
    sweep (also written to ``sweep_summary.json``)."""
    ok, pruned, running, failed = [], [], [], {}
    for job in job_dirs(sweep_dir):
        name = job.relative_to(sweep_dir).as_posix()
        # a job's files come before its trial's result: reading the trial first, a job that ends meanwhile is seen
        # with its files below (read the other way round, it looked unfinished and no longer running: failed)
        if not any((job / f).is_file() for f in (PRUNED_MARKER, FAILED_MARKER, "metrics.json")) \
                and _running_elsewhere(job):
            running.append(name)
        elif (job / PRUNED_MARKER).is_file():
            pruned.append(name)
        elif (job / FAILED_MARKER).is_file():
            failed[name] = json.loads((job / FAILED_MARKER).read_text())["error"]
        elif (job / "metrics.json").is_file():
            ok.append(name)
        else:
            failed[name] = "no metrics.json (killed or still running?)"
    summary = {"ok": ok, "pruned": pruned, "running": running, "failed": failed}
    write_json(sweep_dir / "sweep_summary.json", summary)
    return summary


def refuse_conflicting_jobs(config: DictConfig) -> None:
    """Before a basic sweep writes anything: a ``ConfigError`` when one of its jobs would land in a folder of
    ``hydra.sweep.dir`` that holds a run (finished or with ``last.ckpt``) launched with other overrides, since that
    job would be refused after Hydra had rewritten ``multirun.yaml`` and the job's folder. Re-running the same
    sweep (or one that adds jobs) passes; so does ``overwrite=true``. Optuna and other sweepers pick their jobs
    as they go and are not checked here (each job still refuses on its own)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    sweeper = str(config.hydra.sweeper.get("_target_", ""))
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
    if not sweep_dir.is_dir() or not sweeper.endswith("BasicSweeper") or not str(subdir).startswith(
            "${hydra.job.num}_"):
        return
    typed = [str(o) for o in config.hydra.overrides.task]
    if any(o.split("=")[0].lstrip("+") == "overwrite" and o.split("=", 1)[1].lower() == "true" for o in typed):
        return
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(typed), None)[0]
    except Exception:  # noqa: BLE001 - sweeps the plain parser cannot expand (glob) are checked per job
        return
    for num, job in enumerate(jobs):
        for folder in sweep_dir.glob(f"{num}_*"):
            before = stored_overrides(folder)
            if before is None or not holds_run(folder):
                continue
            added, removed = launch_differences(list(job), before)
            if added or removed:
                raise ConfigError(f"{folder}: holds a run launched with other overrides (now {added}, then "
                                  f"{removed}); sweep into another hydra.sweep.dir (nothing was changed), or "
                                  "overwrite=true")


class SweepSummary(Callback):
    """Hydra callback: before a multirun, refuse one that would land on another sweep's runs (nothing written);
    after it, print which jobs finished and which failed (and why); exit code 1 when any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # Hydra sets it per job only; hydra.sweep.dir may use ${hydra:...}
        try:
            refuse_conflicting_jobs(config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        s = summarize(sweep_dir)
        lines = [f"sweep {sweep_dir}: {len(s['ok'])} finished, {len(s['failed'])} failed"
                 + (f", {len(s['pruned'])} pruned" if s["pruned"] else "")
                 + (f", {len(s['running'])} running in another process" if s["running"] else "")]
        lines += [f"  FAILED {job}: {why}" for job, why in s["failed"].items()]
        print("\n".join(lines), flush=True)
        if s["failed"]:
            raise SystemExit(1)  # the other jobs have run; the sweep as a whole did not succeed
