"""Bootstrap statistics over per-image counts: confidence intervals, paired comparisons, Holm's adjustment.

Every dataset-level score is a function of counts summed over images (confusion matrix, boundary intersections
and unions, calibration bins). A bootstrap resample draws N images with replacement; its sums are one matrix
product: a (B, N) matrix of how often each image was drawn times the (N, K) per-image counts. Scores are then
computed for all B resamples at once, with the same conventions as ``segvoc.evaluation.metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# score name -> the per-image array it is computed from
SCORE_SOURCES = {"miou": "confusion", "pixel_acc": "confusion", "mean_class_acc": "confusion",
                 "boundary_miou": "boundary", "ece": "calibration"}
LOWER_IS_BETTER = frozenset({"ece"})


def draw_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) image indices drawn with replacement from a generator seeded by ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def draw_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64: how often each of ``n`` images appears in each row of ``indices`` (B, k)."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def resampled_sums(per_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B, *shape) sums of ``per_image`` (N, *shape) under each row of ``counts`` (B, N); exact in float64 for
    integer counts below 2**53."""
    n = per_image.shape[0]
    return (counts @ per_image.reshape(n, -1).astype(np.float64)).reshape(counts.shape[0], *per_image.shape[1:])


def _nanmean(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    total = np.where(defined, values, 0.0).sum(-1)
    k = defined.sum(-1)
    return np.where(k > 0, total / np.maximum(k, 1), np.nan)


def confusion_scores(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """``miou``, ``pixel_acc``, ``mean_class_acc`` of each (..., C, C) matrix (rows = truth), as
    ``segvoc.evaluation.metrics.scores_from_confusion``: classes with an empty union (for accuracy: absent from
    the truth) are left out of the means."""
    m = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    gt, pred = m.sum(-1), m.sum(-2)
    union = gt + pred - tp
    total = m.sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"miou": _nanmean(tp / np.maximum(union, 1), union > 0),
                "pixel_acc": np.where(total > 0, tp.sum(-1) / np.maximum(total, 1), np.nan),
                "mean_class_acc": _nanmean(tp / np.maximum(gt, 1), gt > 0)}


def boundary_scores(counts: np.ndarray) -> np.ndarray:
    """Boundary mIoU of each (..., 2, C) array of (intersection, union) per class: the mean over classes with a
    non-empty union."""
    c = np.asarray(counts, dtype=np.float64)
    inter, union = c[..., 0, :], c[..., 1, :]
    return _nanmean(inter / np.maximum(union, 1), union > 0)


def ece_scores(bins: np.ndarray) -> np.ndarray:
    """Expected calibration error of each (..., 3, K) array of (pixel count, confidence sum, correct sum) per bin:
    sum over bins of n_b / N * |accuracy_b - confidence_b|."""
    b = np.asarray(bins, dtype=np.float64)
    n, conf, correct = b[..., 0, :], b[..., 1, :], b[..., 2, :]
    total = n.sum(-1)
    gap = np.abs(correct - conf).sum(-1)  # n_b * |acc_b - conf_b| = |correct_b - conf_sum_b|
    return np.where(total > 0, gap / np.maximum(total, 1), np.nan)


def scores_of(sums: Mapping[str, np.ndarray], names: tuple[str, ...] = tuple(SCORE_SOURCES)) -> dict[str, np.ndarray]:
    """The named scores from summed counts ``{"confusion": (..., C, C), "boundary": (..., 2, C),
    "calibration": (..., 3, K)}``; a score whose source is missing is left out."""
    out: dict[str, np.ndarray] = {}
    if "confusion" in sums:
        out.update(confusion_scores(sums["confusion"]))
    if "boundary" in sums:
        out["boundary_miou"] = boundary_scores(sums["boundary"])
    if "calibration" in sums:
        out["ece"] = ece_scores(sums["calibration"])
    return {k: out[k] for k in names if k in out}


def resampled_scores(per_image: Mapping[str, np.ndarray], counts: np.ndarray,
                     names: tuple[str, ...] = tuple(SCORE_SOURCES)) -> dict[str, np.ndarray]:
    """(B,) values of each named score under the image resamples ``counts`` (B, N)."""
    sources = {SCORE_SOURCES[k] for k in names}
    return scores_of({s: resampled_sums(per_image[s], counts) for s in sources if s in per_image}, names)


def percentile_interval(values: np.ndarray, confidence: float) -> list[float | None]:
    """The central ``confidence`` percentile interval of ``values`` (NaNs, i.e. undefined resamples, dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [None, None]
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(per_image: Mapping[str, np.ndarray], resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, names: tuple[str, ...] = ("miou", "pixel_acc", "mean_class_acc", "boundary_miou"),
                 ) -> dict[str, list[float | None]]:
    """Percentile bootstrap interval of each dataset-level score, resampling images with replacement.

    ``per_image``: ``{"confusion": (N, C, C), ...}`` (see ``SCORE_SOURCES``). Same inputs and seed, same interval.
    """
    n = per_image["confusion"].shape[0]
    if n == 0 or resamples < 1:
        return {k: [None, None] for k in names}
    counts = draw_counts(draw_indices(n, resamples, seed), n)
    values = resampled_scores(per_image, counts, names)
    return {k: percentile_interval(values[k], confidence) for k in names if k in values}


def two_sided_p(deltas: np.ndarray) -> float:
    """Bootstrap two-sided p-value of ``delta == 0``: twice the smaller tail share of the resampled deltas, each
    tail counted as (1 + k) / (1 + B) so that B resamples never claim p = 0; at most 1 (NaN deltas dropped; 1.0
    when every delta is 0)."""
    d = np.asarray(deltas, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan")
    tail = min(np.sum(d <= 0), np.sum(d >= 0))
    return float(min(1.0, 2 * (1 + tail) / (1 + d.size)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), monotone and capped at 1; NaNs stay NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def group_values(run_values: np.ndarray, seed_draws: np.ndarray) -> np.ndarray:
    """(B,) group means: row b averages ``run_values`` (R, B) over the runs drawn in ``seed_draws[b]`` (B, k)."""
    picked = np.take_along_axis(run_values.T, seed_draws, axis=1)  # (B, k)
    return np.nanmean(picked, axis=1)


def compare_groups(group: list[Mapping[str, np.ndarray]], baseline: list[Mapping[str, np.ndarray]],
                   names: tuple[str, ...], resamples: int, seed: int, paired: bool) -> dict[str, np.ndarray]:
    """(B,) bootstrap deltas (group mean minus baseline mean) of each named score.

    Each entry of ``group``/``baseline`` is one run's per-image arrays. Each resample draws the runs (seeds) of
    each group with replacement and, when ``paired``, the same test images for both groups (the runs must hold
    the same ids in the same order); unpaired, each group's images are drawn on their own.
    """
    rng = np.random.default_rng(seed)
    n_g, n_b = group[0]["confusion"].shape[0], baseline[0]["confusion"].shape[0]
    idx_g = rng.integers(0, n_g, size=(resamples, n_g))
    idx_b = idx_g if paired else rng.integers(0, n_b, size=(resamples, n_b))
    seeds_g = rng.integers(0, len(group), size=(resamples, len(group)))
    seeds_b = rng.integers(0, len(baseline), size=(resamples, len(baseline)))
    counts_g, counts_b = draw_counts(idx_g, n_g), draw_counts(idx_b, n_b)
    deltas = {}
    per_run_g = [resampled_scores(r, counts_g, names) for r in group]
    per_run_b = [resampled_scores(r, counts_b, names) for r in baseline]
    for k in names:
        if all(k in r for r in per_run_g + per_run_b):
            deltas[k] = (group_values(np.stack([r[k] for r in per_run_g]), seeds_g)
                         - group_values(np.stack([r[k] for r in per_run_b]), seeds_b))
    return deltas


def verdict(delta: float, p_adjusted: float, alpha: float, metric: str) -> str:
    """``better``/``worse`` when the adjusted p is below ``alpha`` (direction by the metric: lower ECE is
    better), else ``not distinguishable``."""
    if not (p_adjusted < alpha) or delta == 0:
        return "not distinguishable"
    improved = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
    return "better" if improved else "worse"


def interval_fields(per_image: Mapping[str, np.ndarray], stats: Mapping) -> dict:
    """The ``metrics.json`` fields of a split's bootstrap intervals (``ci``), from its per-image arrays and the
    ``stats`` node (``conf/stats/default.yaml``)."""
    return {"ci": bootstrap_ci(per_image, int(stats.get("bootstrap", 1000)), float(stats.get("confidence", 0.95)),
                               int(stats.get("seed", 0)))}
