"""Runs that differ only in ``seed``, grouped, with the mean and sample standard deviation of their scores."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from segvoc.config import stored_overrides

SPLITS = ("val", "test")
METRICS = ("miou", "pixel_acc", "mean_class_acc")


@dataclass
class SeedGroup:
    """Runs whose configs are identical but for ``seed``; ``label`` is the overrides that set it apart."""

    label: str
    runs: list[Path] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, split: str, metric: str) -> list[float]:
        return [m[split][metric] for m in self.metrics if m.get(split, {}).get(metric) is not None]

    def per_class(self, split: str = "test") -> list[list[float]]:
        """Per class, the IoUs of the runs where the class was scored (absent in both truth and prediction: left
        out, as in the mIoU)."""
        per_run = [m.get(split, {}).get("per_class_iou") or [] for m in self.metrics]
        width = max((len(p) for p in per_run), default=0)
        return [[p[c] for p in per_run if c < len(p) and p[c] is not None] for c in range(width)]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is None for fewer than 2 values, both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def config_without_seed(run: Path) -> str:
    """The saved config of ``run`` (``.hydra/config.yaml``) without ``seed``, as a canonical JSON string: equal for
    the runs of one seed group."""
    cfg_file = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False) if cfg_file.is_file() else {"run": str(run)}
    cfg.pop("seed", None)
    return json.dumps(cfg, sort_keys=True, default=str)


def group_by_seed(runs: Sequence[Path], metrics: Sequence[dict[str, Any]]) -> list[SeedGroup]:
    """Group runs whose saved configs (``.hydra/config.yaml``) are equal once ``seed`` is removed. Each group is
    labelled by the command-line overrides (``.hydra/overrides.yaml``) its runs share and not every run shares,
    ``seed=`` excepted (``all runs`` when nothing sets the groups apart)."""
    typed = {r: stored_overrides(r) or [] for r in runs}
    overrides = {r: [o for o in typed[r] if not o.startswith("seed=")] for r in runs}
    everywhere = set.intersection(*(set(o) for o in overrides.values())) if runs else set()
    groups: dict[str, SeedGroup] = {}
    for run, m in zip(runs, metrics, strict=True):
        key = config_without_seed(run)
        if key not in groups:
            own = [o for o in overrides[run] if o not in everywhere]
            groups[key] = SeedGroup(" ".join(own) or (run.name if len(runs) > 1 else "all runs"))
        g = groups[key]
        g.runs.append(run)
        g.metrics.append(m)
        seed = next((o.split("=", 1)[1] for o in typed[run] if o.startswith("seed=")), None)
        g.seeds.append(seed)
    labels = [g.label for g in groups.values()]
    for g in groups.values():  # runs told apart by nothing on their command line (presets): name them by folder
        if labels.count(g.label) > 1:
            g.label = g.runs[0].name
    return list(groups.values())


def summary_rows(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One ``summary.csv`` row per group: ``group``, ``n``, ``<split>_<metric>_mean/_std``, ``iou_<class>_mean``."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"group": g.label, "n": g.n}
        for split in SPLITS:
            for metric in METRICS:
                row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"] = mean_std(g.values(split, metric))
        for name, values in zip(class_names, g.per_class("test"), strict=False):
            row[f"iou_{name}_mean"] = mean_std(values)[0]
        rows.append(row)
    return rows
