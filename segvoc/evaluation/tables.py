"""The per-class table of one evaluation (what ``segvoc.evaluate`` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from segvoc.tables import fmt, markdown_table


def per_class_table(scores: dict[str, Any], class_names: Sequence[str], title: str = "") -> str:
    """Per-class IoU and accuracy of one evaluation under the dataset's class names, then the summary scores."""
    rows = [(name, iou, acc) for name, iou, acc in
            zip(class_names, scores["per_class_iou"], scores.get("per_class_acc", [None] * len(class_names)),
                strict=False)]
    head = f"### {title}\n\n" if title else ""
    summary = (f"\nmIoU {fmt(scores['miou'])} | pixel acc {fmt(scores['pixel_acc'])} | "
               f"mean class acc {fmt(scores['mean_class_acc'])} | loss {fmt(scores.get('loss'))}\n")
    return head + markdown_table(("class", "IoU", "acc"), rows) + summary
