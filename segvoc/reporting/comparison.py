"""Paired comparisons of seed groups on the test split: deltas, bootstrap intervals, Holm-adjusted verdicts.

Each group is compared with a baseline group (``stats.baseline``, default the first group). A bootstrap resample
draws the same test images for both groups (paired) and the runs (seeds) of each group with replacement; the
statistic is the difference of the group means. Groups whose runs do not hold the same test ids cannot be paired
and fall back to drawing each group's images on their own (marked ``unpaired``). p-values are two-sided and
Holm-adjusted across every row of the table. A "where the variance comes from" table puts the std over seeds
beside the bootstrap std over images.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segvoc.errors import ConfigError
from segvoc.evaluation.statistics import (
    compare_groups,
    draw_counts,
    draw_indices,
    holm,
    percentile_interval,
    resampled_scores,
    scores_of,
    two_sided_p,
    verdict,
)
from segvoc.runs.directory import read_per_image
from segvoc.runs.seed_groups import SeedGroup
from segvoc.tables import fmt, markdown_table

COMPARED = ("miou", "pixel_acc", "boundary_miou", "ece")
COLUMNS = ("group", "baseline", "metric", "n_runs", "delta", "ci_lo", "ci_hi", "p", "p_holm", "verdict")


@dataclass
class Comparison:
    """The comparison table, the notes above it and the variance table."""

    rows: list[dict[str, Any]]
    notes: list[str]
    variance: list[dict[str, Any]]


def _group_rows(group: SeedGroup, split: str) -> tuple[list[list[str]], list[dict[str, np.ndarray]]] | None:
    loaded = [read_per_image(run, split) for run in group.runs]
    if any(x is None for x in loaded):
        return None
    return [ids for ids, _ in loaded], [rows for _, rows in loaded]


def _mean_score(runs: Sequence[Mapping[str, np.ndarray]], metric: str) -> float:
    return float(np.mean([scores_of({k: v.sum(0) for k, v in r.items()}, (metric,))[metric] for r in runs]))


def compare(groups: Sequence[SeedGroup], stats: Mapping[str, Any], split: str = "test") -> Comparison | None:
    """Every group against the baseline on ``split``; None with fewer than two groups holding per-image files."""
    loaded = {g.label: _group_rows(g, split) for g in groups}
    usable = [g for g in groups if loaded[g.label] is not None]
    notes = [f"{g.label}: no per_image_{split}.npz (a run of segvoc < 0.4?); left out of the comparison"
             for g in groups if loaded[g.label] is None]
    if len(usable) < 2:
        return None
    base_label = stats.get("baseline") or usable[0].label
    if base_label not in loaded or loaded[base_label] is None:
        raise ConfigError(f"stats.baseline={base_label!r}: no such group with per-image scores; groups: "
                          + ", ".join(repr(g.label) for g in usable))
    resamples, seed = int(stats.get("bootstrap", 1000)) or 1000, int(stats.get("seed", 0))
    base_ids, base_runs = loaded[base_label]
    rows: list[dict[str, Any]] = []
    for g in usable:
        if g.label == base_label:
            continue
        ids, runs = loaded[g.label]
        paired = all(i == base_ids[0] for i in ids + base_ids)
        if not paired:
            notes.append(f"{g.label} vs {base_label}: the runs do not share the same {split} ids; compared with an "
                         "unpaired bootstrap (each group's images drawn on their own)")
        deltas = compare_groups(runs, base_runs, COMPARED, resamples, seed, paired)
        for metric in COMPARED:
            if metric not in deltas:
                continue
            lo, hi = percentile_interval(deltas[metric], float(stats.get("confidence", 0.95)))
            rows.append({"group": g.label, "baseline": base_label, "metric": metric,
                         "n_runs": f"{len(runs)} vs {len(base_runs)}",
                         "delta": _mean_score(runs, metric) - _mean_score(base_runs, metric),
                         "ci_lo": lo, "ci_hi": hi, "p": two_sided_p(deltas[metric]),
                         "paired": paired})
    for row, p_adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p_adj
        row["verdict"] = verdict(row["delta"], p_adj, float(stats.get("alpha", 0.05)), row["metric"])
        if not row["paired"]:
            row["verdict"] += " (unpaired)"
    variance = []
    for g in usable:
        _, runs = loaded[g.label]
        counts = draw_counts(draw_indices(runs[0]["confusion"].shape[0], resamples, seed),
                             runs[0]["confusion"].shape[0])
        per_run = np.stack([resampled_scores(r, counts, ("miou",))["miou"] for r in runs])
        values = [_mean_score([r], "miou") for r in runs]
        variance.append({"group": g.label, "n_runs": len(runs), "miou": float(np.mean(values)),
                         "std_seeds": statistics.stdev(values) if len(values) > 1 else None,
                         "std_images": float(np.nanstd(np.nanmean(per_run, 0), ddof=1))})
    return Comparison(rows, notes, variance)


def comparison_csv(result: Comparison) -> str:
    """``comparison.csv``: one row per (group, metric), columns ``COLUMNS``."""
    lines = [",".join(COLUMNS)]
    for r in result.rows:
        lines.append(",".join("" if r[c] is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                              for c in COLUMNS))
    return "\n".join(lines) + "\n"


def comparison_markdown(result: Comparison, stats: Mapping[str, Any]) -> str:
    """``comparison.md``: the notes, the comparison table and the variance table."""
    conf = float(stats.get("confidence", 0.95))
    out = ["# Paired comparisons (test split)", "",
           f"Δ = group mean − baseline mean; {conf:.0%} interval and two-sided p from a paired bootstrap "
           f"({int(stats.get('bootstrap', 1000))} resamples: the same test images for both groups, the seeds of each "
           f"group drawn with replacement); p Holm-adjusted over the table; verdict at α = {stats.get('alpha', 0.05)}"
           " (for ECE lower is better).", ""]
    out += [f"- {n}" for n in result.notes] + ([""] if result.notes else [])
    out.append(markdown_table(COLUMNS, [[fmt(r[c], 4) if isinstance(r[c], float) else r[c] for c in COLUMNS]
                                        for r in result.rows]))
    out += ["", "## Where the variance comes from", "",
            "std over seeds: sample std of the runs' test mIoU; bootstrap std over images: std of the group's mean "
            "test mIoU when the test images are resampled. The larger one is what more seeds (or more test images) "
            "would narrow.", "",
            markdown_table(("group", "n_runs", "test mIoU", "std over seeds", "bootstrap std over images"),
                           [[v["group"], v["n_runs"], v["miou"], v["std_seeds"], v["std_images"]]
                            for v in result.variance])]
    return "\n".join(out)
