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
    except SegvocError as exc:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
