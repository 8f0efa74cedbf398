"""Paired comparisons of seed groups on the test split: deltas, bootstrap intervals, Holm-adjusted verdicts.

Each group is compared with a baseline group (``stats.baseline``, default the first group). The statistic is the
difference of the group means; its interval and p-value come from ``segvoc.evaluation.statistics.compare_groups``
(the same resampling of test images as the runs' own intervals, the same test images for both groups). Groups whose
runs do not hold the same test ids cannot be paired and fall back to drawing each group's images on their own
(marked ``unpaired``). A row gets a verdict only with at least ``stats.min_runs`` runs in each group and
``stats.min_images`` test images; below either it gives the delta and the reason, no p-value. p-values are
two-sided and Holm-adjusted across the rows that have one. A "where the variance comes from" table puts the std
over seeds beside the bootstrap std over images.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segvoc.errors import ConfigError
from segvoc.evaluation.statistics import (
    class_reason,
    compact,
    compare_groups,
    draw_counts,
    draw_indices,
    fixed_classes,
    holm,
    image_count,
    resampled_scores,
    scores_of,
    split_sums,
    verdict,
    verdict_evidence,
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
    return float(np.mean([scores_of(split_sums(r), (metric,))[metric] for r in runs]))


def compare_loaded(loaded: Mapping[str, tuple[list[list[str]], list[dict[str, np.ndarray]]]], base_label: str,
                   stats: Mapping[str, Any], split: str = "test") -> tuple[list[dict[str, Any]], list[str]]:
    """The comparison rows (``COLUMNS``, plus ``paired``) and notes of every group against ``base_label``, from each
    group's runs' (ids, per-image arrays)."""
    notes: list[str] = []
    resamples, seed = int(stats.get("bootstrap", 1000)) or 1000, int(stats.get("seed", 0))
    confidence, min_per_class = float(stats.get("confidence", 0.95)), int(stats.get("min_images_per_class", 3))
    loaded = {label: (ids, [compact(r) for r in runs]) for label, (ids, runs) in loaded.items()}
    base_ids, base_runs = loaded[base_label]
    rows: list[dict[str, Any]] = []
    for label, (ids, runs) in loaded.items():
        if label == base_label:
            continue
        paired = all(i == base_ids[0] for i in ids + base_ids)
        if not paired:
            notes.append(f"{label} vs {base_label}: the runs do not share the same {split} ids; compared with an "
                         "unpaired bootstrap (each group's images drawn on their own)")
        if len(runs) == 1 and len(base_runs) == 1:
            notes.append(f"{label} vs {base_label}: one run per group. A difference between single runs includes "
                         "seed noise that the test cannot see; train each configuration with more seeds "
                         f"(at least stats.min_runs={stats.get('min_runs', 2)}) before reading it as an effect")
        images = min(len(ids[0]), len(base_ids[0]))
        short = verdict_evidence(len(runs), len(base_runs), images, stats)
        deltas = {} if short else compare_groups(runs, base_runs, COMPARED, resamples, seed, paired, confidence)
        for metric in COMPARED:
            if not all(scores_of(split_sums(r), (metric,)) for r in runs + base_runs):  # its counts are missing
                continue
            row = {"group": label, "baseline": base_label, "metric": metric,
                   "n_runs": f"{len(runs)} vs {len(base_runs)}",
                   "delta": _mean_score(runs, metric) - _mean_score(base_runs, metric),
                   "ci_lo": None, "ci_hi": None, "p": None, "paired": paired, "reason": short}
            rare = next((r for run in runs + base_runs if (r := class_reason(run, metric, min_per_class))), None)
            if not short and rare:
                row["reason"] = f"n/a: {rare}"
            elif not short and deltas[metric].interval.reason:
                row["reason"] = f"n/a: {deltas[metric].interval.reason}"
            elif not short:
                d = deltas[metric]
                row.update(ci_lo=d.interval.lo, ci_hi=d.interval.hi, p=d.p)
            rows.append(row)
    p_holm = holm([float("nan") if r["p"] is None else r["p"] for r in rows])
    for row, p_adj in zip(rows, p_holm, strict=True):
        row["p_holm"] = None if row["p"] is None else p_adj
        row["verdict"] = row.pop("reason") or verdict(row["delta"], p_adj, float(stats.get("alpha", 0.05)),
                                                      row["metric"])
        if not row["paired"]:
            row["verdict"] += " (unpaired)"
    return rows, notes


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
    rows, more = compare_loaded({g.label: loaded[g.label] for g in usable}, base_label, stats, split)
    notes += more
    resamples, seed = int(stats.get("bootstrap", 1000)) or 1000, int(stats.get("seed", 0))
    variance = []
    for g in usable:
        _, runs = loaded[g.label]
        counts = draw_counts(draw_indices(image_count(runs[0]), resamples, seed), image_count(runs[0]))
        per_run = np.stack([resampled_scores(r, counts, ("miou",), fixed_classes(r))["miou"] for r in runs])
        values = [_mean_score([r], "miou") for r in runs]
        few = image_count(runs[0]) < int(stats.get("min_images", 10))  # a std over 1 image would read 0
        variance.append({"group": g.label, "n_runs": len(runs), "miou": float(np.mean(values)),
                         "std_seeds": statistics.stdev(values) if len(values) > 1 else None,
                         "std_images": None if few else float(np.nanstd(np.nanmean(per_run, 0), ddof=1))})
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
           f"Δ = group mean − baseline mean; {conf:.0%} BCa interval and two-sided p from "
           f"{int(stats.get('bootstrap', 1000))} resamples of the test images (the same images for both groups, each "
           "run's scores over its own class set) plus the seed noise of the group means (Student t on the runs' "
           f"pooled std); p Holm-adjusted over the rows that have one; verdict at α = {stats.get('alpha', 0.05)} "
           f"(for ECE lower is better). A verdict needs at least stats.min_runs={stats.get('min_runs', 2)} runs per "
           f"group and stats.min_images={stats.get('min_images', 10)} test images, an interval every averaged class "
           "in the truth of at least "
           f"stats.min_images_per_class={stats.get('min_images_per_class', 3)} images; below that the row gives Δ "
           "and the reason (docs/statistics.md).", ""]
    out += [f"- {n}" for n in result.notes] + ([""] if result.notes else [])
    out.append(markdown_table(COLUMNS, [[fmt(r[c], 4) if isinstance(r[c], float) else r[c] for c in COLUMNS]
                                        for r in result.rows]))
    out += ["", "## Where the variance comes from", "",
            "std over seeds: sample std of the runs' test mIoU; bootstrap std over images: std of the group's mean "
            "test mIoU when the test images are resampled (- below stats.min_images test images). The larger one is "
            "what more seeds (or more test images) would narrow.", "",
            markdown_table(("group", "n_runs", "test mIoU", "std over seeds", "bootstrap std over images"),
                           [[v["group"], v["n_runs"], v["miou"], v["std_seeds"], v["std_images"]]
                            for v in result.variance])]
    return "\n".join(out)
