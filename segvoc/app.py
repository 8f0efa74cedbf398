"""What every entry point does around its work: quiet known library noise, and print user-fixable errors as one
line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from segvoc.config import check_values
from segvoc.errors import SegvocError

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


def run_app(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Check ``cfg`` (``segvoc.config.check_values``), then call ``fn(cfg)``; a ``SegvocError`` becomes
    ``error: <message>`` on stderr and exit code 2.

    ``traceback=true`` in the config or ``HYDRA_FULL_ERROR=1`` re-raises it with its traceback.
    """
    quiet_library_noise()
    try:
        check_values(cfg)  # the numbers and mandatory keys a user types, before any work
        return fn(cfg)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or cfg.get("traceback") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_message(user_error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def find_user_error(exc: BaseException | None) -> SegvocError | None:
    """The ``SegvocError`` in an exception's cause chain (Hydra's ``instantiate`` and Lightning wrap them)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SegvocError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
