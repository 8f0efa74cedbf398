"""Markdown tables: cells and whole tables (any folder may use them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table cell; ``-`` for missing values."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_ci(value: Any, interval: Any = None, reason: str | None = None, digits: int = 4) -> str:
    """``value [lo, hi]``: a score with its bootstrap interval (``metrics.json`` ``ci``); ``value [n/a: reason]``
    when the split has no trustworthy interval (``ci_na``); the value alone for neither (older runs)."""
    if interval and interval[0] is not None:
        return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"
    if reason:
        return f"{fmt(value, digits)} [n/a: {reason}]"
    return fmt(value, digits)
