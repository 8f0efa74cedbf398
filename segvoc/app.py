"""What every entry point does around its work, in one place: check every value before anything is written
(``Preflight``, a Hydra callback, and again in ``run_app``), quiet known library noise, and the failure policy
(``run_app``): a user-fixable error is one line and exit code 2; in a multirun a failing job is recorded
(``FAILED.json``, or ``PRUNED.json`` for a pruned Optuna trial) and the sweep goes on, while an interrupted job stops
the sweep. Imported by entry points only."""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from segvoc.config import check_values
from segvoc.errors import InterruptedRun, SegvocError

log = logging.getLogger("segvoc")


def quiet_library_noise() -> None:
    """Silence specific messages of Lightning 2.6 that every run would print and no user can act on.

    - Lightning's pytree helper trips torch's deprecation of ``isinstance(treespec, LeafSpec)`` on every step.
    - Lightning advertises its cloud services, ``litlogger`` (when a run logs to TensorBoard) and ``litmodels``
      (when a checkpoint callback is used), as "Tip" lines.
    Called by entry points only: importing segvoc changes no global filter.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_advertising)


def _no_advertising(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("Tip:" in message and ("litlogger" in message or "litmodels" in message))


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run_app(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Check ``cfg`` (``segvoc.config.check_values``), then return ``fn(cfg)`` under the failure policy (module
    docstring). A failed or pruned multirun job returns None. ``traceback=true`` in the config or
    ``HYDRA_FULL_ERROR=1`` re-raises a user error with its traceback."""
    from segvoc.runs.optuna_study import PrunedRun
    from segvoc.runs.sweep import record_failure, record_pruned

    quiet_library_noise()
    try:
        check_values(cfg)  # the values a user types, before any work
        return fn(cfg)
    except InterruptedRun as exc:
        if not _multirun():
            _exit_one_line(exc, cfg)
        print(f"error: {exc}; sweep stopped", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except PrunedRun as exc:  # an Optuna trial its pruner stopped: the sweeper tells the study PRUNED
        log.info("trial pruned: %s", exc)
        record_pruned(_job_dir(), exc)
        return None
    except Exception as exc:
        if not _multirun():
            _exit_one_line(exc, cfg)
        log.error("job failed: %s: %s", type(exc).__name__, exc)
        record_failure(_job_dir(), exc)
        return None


def _exit_one_line(exc: BaseException, cfg: DictConfig) -> None:
    """``error: <message>`` on stderr and exit code 2 for a user error; anything else propagates."""
    user_error = find_user_error(exc)
    if user_error is None or cfg.get("traceback") or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"error: {user_message(user_error)}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def find_user_error(exc: BaseException | None) -> SegvocError | None:
    """The ``SegvocError`` behind an exception: in its causes or contexts, both followed (Hydra's ``instantiate``
    and Lightning wrap them; an error raised while a loader shuts its workers down carries the worker's error as
    context), or named by a DataLoader worker's re-raised message when torch could not rebuild its type."""
    todo, seen = [exc], set()
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, SegvocError):
            return exc
        from_worker = _worker_error(exc)
        if from_worker is not None:
            return from_worker
        todo += [exc.__cause__, exc.__context__]
    return None


def _worker_error(exc: BaseException) -> SegvocError | None:
    """The ``SegvocError`` a DataLoader worker raised, from the text of the exception that carries it."""
    import re

    from segvoc import errors

    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return None
    found = re.findall(r"^segvoc\.errors\.(\w+): (.*)$", text, re.M)
    kind = getattr(errors, found[-1][0], None) if found else None
    return kind(found[-1][1]) if isinstance(kind, type) and issubclass(kind, SegvocError) else None


def user_message(error: SegvocError) -> str:
    """The one-line message of a ``SegvocError``, also when it was raised in a DataLoader worker.

    PyTorch re-raises a worker's exception in the main process as the same type with the message
    ``Caught X in DataLoader worker process N.`` followed by the worker's traceback, whose last line is
    ``module.X: <original message>``.
    """
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else text.splitlines()[0]


class Preflight(Callback):
    """Hydra callback of every command: before Hydra creates the output directory (``on_run_start``;
    ``on_multirun_start`` for a sweep's shared values), check every value (``check_values``), the config stored in
    ``ckpt=`` (rule D) and, for ``segvoc.train``, the run directory's rules (``segvoc.runs.lifecycle.decide``,
    reading only). A refusal is one line and exit code 2, and writes nothing."""

    def _check(self, config: DictConfig, dir_key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        cfg = copy.deepcopy(config)
        with open_dict(cfg):
            del cfg["hydra"]
            if "paths" in cfg:  # Hydra sets the output dir later, when it creates it
                cfg.paths.output_dir = str(Path(str(config.hydra[dir_key].dir)).absolute())
        try:
            check_values(cfg)
            command = config.hydra.job.config_name
            if command in ("evaluate", "predict", "export"):  # rule D: the stored config, before anything is built
                from segvoc.deploy.exported import check_stored_config

                check_stored_config(cfg.ckpt, cfg.get("trusted_targets") or ())
            if command == "train" and dir_key == "run":
                from segvoc.runs.lifecycle import decide, launch_rank

                if launch_rank() == 0:
                    decide(cfg)
        except SegvocError as exc:
            if cfg.get("traceback") or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")
