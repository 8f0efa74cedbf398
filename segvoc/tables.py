"""Markdown tables of scores (per-class IoU, results rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from segvoc.data.palette import VOC_CLASSES


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


def per_class_table(scores: dict[str, Any], title: str = "", class_names: Sequence[str] = VOC_CLASSES) -> str:
    """Per-class IoU and accuracy of one evaluation, then the summary scores."""
    rows = [(name, iou, acc) for name, iou, acc in
            zip(class_names, scores["per_class_iou"], scores.get("per_class_acc", [None] * len(class_names)),
                strict=False)]
    head = f"### {title}\n\n" if title else ""
    summary = (f"\nmIoU {fmt(scores['miou'])} | pixel acc {fmt(scores['pixel_acc'])} | "
               f"mean class acc {fmt(scores['mean_class_acc'])} | loss {fmt(scores.get('loss'))}\n")
    return head + markdown_table(("class", "IoU", "acc"), rows) + summary
