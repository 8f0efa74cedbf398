"""The life of a run directory, behind one call: ``open_run(cfg)``.

It applies the safety issue's rules to training runs, in this order:

- decide (reading only; every refusal happens here, before anything is written): start a new run, resume an
  unfinished one (``resume=<dir>``, ``resume=auto``), skip a finished one (``resume=auto``), or start again
  (``overwrite=true``); check ``ckpt_path``;
- rule B, one owner: take the directory's lock for the launch's life (``segvoc.safety.run_lock``), then decide again
  (another launch may have finished meanwhile);
- rule A, ownership: claim the directory (``.segvoc.json``), or prove it is segvoc's before clearing what an earlier
  run left (``segvoc.safety.ownership``); remove the temp files a killed atomic write left behind;
- write this launch's config (``.hydra/`` for a new run, ``.hydra_resume/`` when continuing one);
- rule C, commit last: ``Run.commit`` writes ``.segvoc-finished.json`` after every artifact, atomically, and only
  that marker makes a run finished for ``resume=auto`` (a run that died in its final phase is resumed and re-scored).

Under DDP only global rank 0 decides and writes. It publishes its decision (``.segvoc-launch.json`` and the
environment variable ``SEGVOC_LAUNCH``, which Lightning's launcher passes to the ranks it starts); the other ranks
follow it and never delete.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from segvoc.config import command_line_overrides, stored_overrides
from segvoc.data.layouts import with_classes
from segvoc.data.synthetic import check_root
from segvoc.engine.checkpoint import read_checkpoint
from segvoc.errors import ConfigError
from segvoc.runs.directory import (
    RUN_OUTPUTS,
    check_resume_position,
    ensure_writable,
    holds_run,
    launch_differences,
    not_writable,
    resume_config,
    resume_overrides,
)
from segvoc.runs.sweep import clear_failure
from segvoc.safety import ownership, run_lock
from segvoc.utils import write_json

log = logging.getLogger("segvoc.train")

FINISHED = ".segvoc-finished.json"   # rule C: written last; a run is finished only with it
LAUNCH = ".segvoc-launch.json"       # rank 0's decision, for the other ranks
LAUNCH_ENV = "SEGVOC_LAUNCH"
CLEARED = (*RUN_OUTPUTS, ".hydra", ".hydra_resume", FINISHED, LAUNCH)  # what overwrite/auto-start remove
STALE_TEMPS = ("*.ckpt", "metrics.json", "confusion.json", "per_image_*", "class_weights.json", "MODEL_CARD.md",
               "tracker.json", "FAILED.json", "PRUNED.json", FINISHED, LAUNCH)
FIX = "pick another hydra.run.dir (or a new sweep dir)"


def legacy_run(folder: Path) -> bool:
    """A run directory of segvoc 0.3/0.4 (no marker): ``.hydra/config.yaml`` and a checkpoint holding a segvoc
    config."""
    if not (folder / ".hydra" / "config.yaml").is_file():
        return False
    for ckpt in sorted((folder / "checkpoints").glob("*.ckpt")):
        try:
            read_checkpoint(ckpt)
            return True
        except Exception:  # noqa: BLE001 - not readable as a segvoc checkpoint: not evidence
            continue
    return False


def finished(folder: Path) -> bool:
    """Whether the run in ``folder`` wrote every artifact: its commit marker, or (unmarked runs of segvoc 0.3/0.4)
    ``metrics.json`` and ``MODEL_CARD.md``, which those versions wrote last."""
    if (folder / FINISHED).is_file():
        return True
    return (ownership.read_marker(folder) is None and (folder / "metrics.json").is_file()
            and (folder / "MODEL_CARD.md").is_file())


@dataclass
class Run:
    """What ``open_run`` decided for this launch."""

    dir: Path
    action: str                          # start | resume | finished
    cfg: DictConfig                      # the config to train with (a resumed run's own, carried overrides on it)
    ckpt_path: str | None = None         # the checkpoint fit continues from (resume=, ckpt_path=)
    purge_step: int | None = None        # loggers drop what an earlier launch logged from this step on
    metrics: dict[str, Any] | None = None  # a finished run's metrics
    clear: bool = False                  # an earlier run's outputs are removed first (overwrite, auto-start)

    def commit(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Rule C: mark the run finished, last (rank 0); returns ``metrics``."""
        if launch_rank() == 0:
            write_json(self.dir / FINISHED, {"finished": _now(), "metrics": metrics})
        return metrics


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def launch_rank() -> int:
    """This process's global rank as the launcher set it before any process group exists: ``RANK`` (torchrun),
    ``SLURM_PROCID`` in a multi-task SLURM step, else Lightning's ``NODE_RANK``/``LOCAL_RANK``; 0 alone."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_PROCID"):
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", "0") or 0) + int(env.get("LOCAL_RANK", "0") or 0)


def _launch_key() -> str:
    """What the ranks of one launch share: the scheduler's ids, else (Lightning's launcher) rank 0's pid."""
    env = os.environ
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID"):
        if env.get(key):
            return f"{env.get('SLURM_JOB_ID', '')}.{env[key]}"
    return f"pid{os.getpid()}"


def decide(cfg: DictConfig, overrides: list[str] | None = None) -> Run:
    """What this launch does with ``cfg.paths.output_dir``; reads only. Every refusal of a run-directory rule is
    raised here (one line each)."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as typed
    out = Path(cfg.paths.output_dir)
    overrides = command_line_overrides() if overrides is None else overrides
    resume, overwrite = cfg.get("resume"), bool(cfg.get("overwrite"))
    if overwrite and resume not in (None, "auto"):
        raise ConfigError(f"overwrite=true with resume={resume}: choose one (overwrite starts the run again)")
    if resume not in (None, "auto"):
        run_dir = Path(resume).expanduser().resolve()
        ownership.check_owned(run_dir, "run", legacy_run, "resume= takes the run directory of a segvoc run")
        run = Run(run_dir, "resume", resume_config(cfg, overrides))
    elif overwrite:  # clears only names a run writes (the lock, a log Hydra opened, are no earlier run)
        run = Run(out, "start", cfg, clear=_earlier_outputs(out))
    elif resume == "auto":
        run = _auto(cfg, out, overrides)
    elif holds_run(out):
        raise ConfigError(f"{out}: holds another run's files (checkpoints or metrics.json); continue it with "
                          f"resume={out} (or resume=auto), replace it with overwrite=true, or pick another "
                          "hydra.run.dir")
    else:
        run = Run(out, "start", cfg)
    if run.cfg.data.get("synthetic"):  # data=synthetic (re)generates its tree at data.root: must be segvoc's
        check_root(run.cfg.data.root)
    if run.action == "start":  # the dataset's classes, into the config every checkpoint and output carries
        run.cfg = with_classes(run.cfg)
    if run.clear:
        ownership.check_owned(out, "run", legacy_run, f"{FIX}, or delete it yourself")
    elif run.action == "start":  # a new run: the folder must not hold run outputs segvoc did not write
        _claimable(out)
    if run.action == "resume":
        run.ckpt_path = str(run.cfg.ckpt_path)
    elif cfg.get("ckpt_path"):
        run.ckpt_path = str(cfg.ckpt_path)
    if run.ckpt_path and run.action != "finished":
        ckpt = read_checkpoint(run.ckpt_path, what="ckpt_path")
        if "optimizer_states" not in ckpt:
            raise ConfigError(f"ckpt_path={run.ckpt_path}: holds weights only (no optimizer state), so training "
                              "cannot continue from it; use that run's checkpoints/last.ckpt")
        check_resume_position(run.cfg, ckpt, run.ckpt_path)
        run.purge_step = int(ckpt.get("global_step", 0)) or None
    if run_lock.is_locked(run.dir):
        raise ConfigError(f"{run.dir}: another launch is running in it ({run_lock.holder_text(run.dir)}); wait for it "
                          f"to end, or {FIX}")
    return run


def _claimable(out: Path) -> None:
    if ownership.owned(out, "run", legacy_run) or ownership.is_empty(out):
        return
    foreign = [n for n in CLEARED if (out / n).exists()]
    if foreign:
        raise ConfigError(f"{out}: holds {', '.join(foreign[:4])} that segvoc did not write (no "
                          f"{ownership.MARKER}); a run writes and later clears those names: {FIX}")


def _auto(cfg: DictConfig, out: Path, overrides: list[str]) -> Run:
    """``resume=auto``: resume an unfinished run (``checkpoints/last.ckpt``), skip a finished one, else start (after
    clearing what a start that never reached a checkpoint left). A run launched with other overrides (what would be
    trained differs) is never resumed or skipped."""
    before = stored_overrides(out)
    done, last = finished(out), out / "checkpoints" / "last.ckpt"
    if before is not None and (done or last.is_file()):
        added, removed = launch_differences(overrides, before)
        if added or removed:
            raise ConfigError(f"{out}: holds a run launched with other overrides (now {added}, then {removed}); use "
                              "another hydra.sweep.dir / hydra.run.dir, or overwrite=true")
    if done:
        marker = out / FINISHED
        metrics = (json.loads(marker.read_text())["metrics"] if marker.is_file()
                   else json.loads((out / "metrics.json").read_text()))
        return Run(out, "finished", cfg, metrics=metrics)
    if last.is_file():
        ownership.check_owned(out, "run", legacy_run, f"{FIX}, or delete it yourself")
        with open_dict(cfg):
            cfg.resume = str(out)
        return Run(out, "resume", resume_config(cfg, resume_overrides(overrides, before)))
    with open_dict(cfg):
        cfg.resume = None
    return Run(out, "start", cfg, clear=_earlier_outputs(out))


def _earlier_outputs(out: Path) -> bool:
    """Whether ``out`` holds what an earlier run wrote (and a new start clears)."""
    return holds_run(out) or any((out / n).exists() for n in CLEARED)


def _act(run: Run) -> None:
    """Carry out a decision (rank 0, holding the lock)."""
    if run.clear:
        ownership.remove_owned([run.dir / n for n in CLEARED], run.dir, "run", legacy_run, FIX)
    ownership.claim(run.dir, "run", CLEARED, legacy_run, FIX)
    ownership.remove_stale_temps(run.dir, STALE_TEMPS)
    ownership.remove_stale_temps(run.dir / "checkpoints", STALE_TEMPS)
    ensure_writable(run.dir)
    clear_failure(run.dir)  # this job runs again: a FAILED.json of an earlier attempt no longer describes it
    _save_launch_config(run)
    launch = {"key": _launch_key(), "action": run.action, "ckpt_path": run.ckpt_path, "purge_step": run.purge_step,
              "cfg": OmegaConf.to_container(run.cfg, resolve=False)}
    write_json(run.dir / LAUNCH, launch)
    os.environ[LAUNCH_ENV] = str(run.dir / LAUNCH)  # the ranks Lightning starts inherit it


def _save_launch_config(run: Run) -> None:
    """This launch's config, as Hydra would save it (``hydra.output_subdir`` is null in segvoc's configs so that a
    refused launch writes nothing): ``.hydra/`` for a new run, ``.hydra_resume/`` when continuing one (the run's
    original config stays)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import _save_config

    if not HydraConfig.initialized() or OmegaConf.is_missing(HydraConfig.get().runtime, "output_dir"):
        return  # composed outside a command (segvoc.config.compose: tests, notebooks): nothing to save
    hydra_cfg = HydraConfig.get()
    folder = run.dir / (".hydra_resume" if run.action == "resume" else ".hydra")
    task_cfg = run.cfg if run.action != "resume" else OmegaConf.create(OmegaConf.to_container(run.cfg))
    _save_config(task_cfg, "config.yaml", folder)
    _save_config(OmegaConf.create({"hydra": hydra_cfg}), "hydra.yaml", folder)
    _save_config(OmegaConf.create(list(hydra_cfg.overrides.task)), "overrides.yaml", folder)


def _follow(cfg: DictConfig) -> Run:
    """A rank other than 0: rank 0's decision for this launch (never decides, never deletes)."""
    path = Path(os.environ.get(LAUNCH_ENV) or Path(cfg.paths.output_dir) / LAUNCH)
    key, deadline = _launch_key(), time.monotonic() + 600
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            launch = json.loads(path.read_text())
            if os.environ.get(LAUNCH_ENV) or launch["key"] == key:
                run_cfg = OmegaConf.create(launch["cfg"])
                return Run(path.parent, launch["action"], run_cfg, ckpt_path=launch["ckpt_path"],
                           purge_step=launch.get("purge_step"))
        if time.monotonic() > deadline:
            raise ConfigError(f"{path}: rank {launch_rank()} found no decision of rank 0 for this launch after 10 "
                              "minutes; is rank 0 running?")
        time.sleep(0.5)


@contextlib.contextmanager
def open_run(cfg: DictConfig) -> Iterator[Run]:
    """The run directory of a training launch: decided, locked, owned and set up (see the module docstring)."""
    if launch_rank() != 0:
        yield _follow(cfg)
        return
    decide(cfg)  # refuse before writing anything
    out = Path(cfg.paths.output_dir) if cfg.get("resume") in (None, "auto") else Path(cfg.resume).expanduser()
    try:
        run_lock.acquire(out.resolve())
    except OSError as exc:
        raise not_writable(out, exc) from None
    try:
        run = decide(cfg)  # again, under the lock
        if run.action == "finished":
            print(f"skipped, finished: {run.dir} (test mIoU {run.metrics['test']['miou']:.4f}; overwrite=true runs "
                  "it again)", flush=True)
        else:
            _act(run)
            if run.action == "resume":
                log.info("resuming the unfinished run in %s", run.dir)
        yield run
    finally:
        run_lock.release(out.resolve())
