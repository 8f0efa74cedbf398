"""Running an app function so that user-fixable errors print as one line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from segvoc.errors import SegvocError

log = logging.getLogger("segvoc")


def run_app(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg)``; a ``SegvocError`` becomes ``error: <message>`` on stderr and exit code 2.

    ``debug=true`` in the config or ``HYDRA_FULL_ERROR=1`` re-raises it with its traceback.
    """
    try:
        return fn(cfg)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
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
