"""Bootstrap statistics over per-image counts: confidence intervals, paired comparisons, Holm's adjustment.

Every dataset-level score is a function of counts summed over images (confusion matrix, boundary intersections
and unions, calibration bins). A bootstrap resample draws N images with replacement; its sums are one matrix
product: a (B, N) matrix of how often each image was drawn times the (N, K) per-image counts (confusion matrices
reduced to their per-class ``marginals`` first). Scores are then computed for all B resamples at once, with the same
conventions as ``segvoc.evaluation.metrics``.

Class set: the class-mean scores of a resample (mIoU, mean class accuracy, boundary mIoU) average over the classes
of the whole split (``fixed_classes``). A class that a resample misses (empty union; for accuracy, absent from the
truth) counts at its value on the whole split. Leaving it out instead moves the resampled means off the estimate:
rare classes have low IoU, so resamples that miss them score higher.

Interval: BCa (Efron 1987), the percentiles of the bootstrap distribution moved by its bias ``z0`` (the estimate's
own level in it, Φ(z0)) and its skew ``a`` (jackknife over images). Its endpoints sit at the levels
α1 = Φ(z0 + (z0 - z) / (1 - a (z0 - z))) and α2 = Φ(z0 + (z0 + z) / (1 - a (z0 + z))), z = z_{(1+confidence)/2}:
α1 ≤ Φ(z0) ≤ α2 exactly when |z0| ≤ z (and 1 - a (z0 ± z) > 0, always so for |a| ≤ 1/6, which the jackknife
formula guarantees, and confidence < 99.7 %). Each endpoint is the order statistic at its level, taken on the
estimate's side, so the interval contains the estimate; a bootstrap whose estimate lies outside its own central
``confidence`` share gives no interval but the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# score name -> the per-image array it is computed from
SCORE_SOURCES = {"miou": "confusion", "pixel_acc": "confusion", "mean_class_acc": "confusion",
                 "boundary_miou": "boundary", "ece": "calibration"}
LOWER_IS_BETTER = frozenset({"ece"})
CI_SCORES = ("miou", "pixel_acc", "mean_class_acc", "boundary_miou")  # the scores metrics.json gives intervals
# the scores that average over classes: stats.min_images_per_class counts the images of those classes
CLASS_MEANS = ("miou", "mean_class_acc", "boundary_miou")
_NORMAL = NormalDist()

PerClass = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval ``[lo, hi]``, or the reason there is none (``lo``, ``hi`` None)."""

    lo: float | None = None
    hi: float | None = None
    reason: str | None = None

    def bounds(self) -> list[float] | None:
        """``[lo, hi]``, or None without an interval (as ``metrics.json`` stores it)."""
        return None if self.lo is None else [self.lo, self.hi]


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


def marginals(confusion: np.ndarray) -> np.ndarray:
    """(..., 3, C) per class (TP, truth pixels, predicted pixels) of (..., C, C) confusion matrices (rows = truth):
    all that the confusion scores read, C / 3 times fewer numbers to resample."""
    m = np.asarray(confusion, dtype=np.float64)
    return np.stack([np.diagonal(m, axis1=-2, axis2=-1), m.sum(-1), m.sum(-2)], -2)


def _confusion_marginals(sums: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "marginals" in sums:
        return np.asarray(sums["marginals"], dtype=np.float64)
    return marginals(sums["confusion"]) if "confusion" in sums else None


def compact(per_image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-image arrays with the confusion matrices replaced by their ``marginals``: every function here takes
    either, the compact form saves recomputing them when one split is scored many times (comparisons)."""
    out = {k: v for k, v in per_image.items() if k != "confusion"}
    if "confusion" in per_image:
        out["marginals"] = marginals(per_image["confusion"])
    return out


def image_count(per_image: Mapping[str, np.ndarray]) -> int:
    """How many images the per-image arrays hold."""
    return int(next(iter(per_image.values())).shape[0])


def per_class_values(sums: Mapping[str, np.ndarray]) -> PerClass:
    """``{score: (values, defined)}``, each (..., C), of the class-mean scores in ``sums`` (``confusion``, or its
    ``marginals``; ``boundary``): IoU (defined where the union is non-empty), accuracy (where the class is in the
    truth), boundary IoU (non-empty boundary union)."""
    out: PerClass = {}
    if (m := _confusion_marginals(sums)) is not None:
        tp, gt, pred = m[..., 0, :], m[..., 1, :], m[..., 2, :]
        union = gt + pred - tp
        out["miou"] = (tp / np.maximum(union, 1), union > 0)
        out["mean_class_acc"] = (tp / np.maximum(gt, 1), gt > 0)
    if "boundary" in sums:
        c = np.asarray(sums["boundary"], dtype=np.float64)
        inter, union = c[..., 0, :], c[..., 1, :]
        out["boundary_miou"] = (inter / np.maximum(union, 1), union > 0)
    return out


def split_sums(per_image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole split's counts: each per-image array summed over images."""
    return {k: np.asarray(v).sum(0) for k, v in per_image.items()}


def fixed_classes(per_image: Mapping[str, np.ndarray]) -> PerClass:
    """The class set (and per-class values) of the whole split, which every resample of it averages over."""
    return per_class_values(split_sums(per_image))


def confusion_scores(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """``miou``, ``pixel_acc``, ``mean_class_acc`` of each (..., C, C) matrix (rows = truth), as
    ``segvoc.evaluation.metrics.scores_from_confusion``: classes with an empty union (for accuracy: absent from
    the truth) are left out of the means."""
    return scores_of({"confusion": matrices}, ("miou", "pixel_acc", "mean_class_acc"))


def boundary_scores(counts: np.ndarray) -> np.ndarray:
    """Boundary mIoU of each (..., 2, C) array of (intersection, union) per class: the mean over classes with a
    non-empty union."""
    return scores_of({"boundary": counts}, ("boundary_miou",))["boundary_miou"]


def ece_scores(bins: np.ndarray) -> np.ndarray:
    """Expected calibration error of each (..., 3, K) array of (pixel count, confidence sum, correct sum) per bin:
    sum over bins of n_b / N * |accuracy_b - confidence_b|."""
    b = np.asarray(bins, dtype=np.float64)
    n, conf, correct = b[..., 0, :], b[..., 1, :], b[..., 2, :]
    total = n.sum(-1)
    gap = np.abs(correct - conf).sum(-1)  # n_b * |acc_b - conf_b| = |correct_b - conf_sum_b|
    return np.where(total > 0, gap / np.maximum(total, 1), np.nan)


def scores_of(sums: Mapping[str, np.ndarray], names: tuple[str, ...] = tuple(SCORE_SOURCES),
              classes: PerClass | None = None) -> dict[str, np.ndarray]:
    """The named scores from summed counts ``{"confusion": (..., C, C) (or its ``marginals``), "boundary":
    (..., 2, C), "calibration": (..., 3, K)}``; a score whose source is missing is left out.

    ``classes`` (``fixed_classes`` of a split): the class-mean scores average over that class set, a class the
    counts miss taking its value there; without it, over the classes the counts hold."""
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k, (values, defined) in per_class_values(sums).items():
            if classes is not None and k in classes:
                values = np.where(defined, values, classes[k][0])
                defined = np.broadcast_to(classes[k][1], values.shape)
            out[k] = _nanmean(values, defined)
        if (m := _confusion_marginals(sums)) is not None:
            total = m[..., 1, :].sum(-1)
            out["pixel_acc"] = np.where(total > 0, m[..., 0, :].sum(-1) / np.maximum(total, 1), np.nan)
        if "calibration" in sums:
            out["ece"] = ece_scores(sums["calibration"])
    return {k: out[k] for k in names if k in out}


def _sources(per_image: Mapping[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The per-image arrays the named scores read, confusion matrices as their ``marginals``."""
    out = {}
    for s in {SCORE_SOURCES[k] for k in names}:
        if s == "confusion" and (m := _confusion_marginals(per_image)) is not None:
            out["marginals"] = m
        elif s in per_image:
            out[s] = per_image[s]
    return out


def resampled_scores(per_image: Mapping[str, np.ndarray], counts: np.ndarray,
                     names: tuple[str, ...] = tuple(SCORE_SOURCES),
                     classes: PerClass | None = None) -> dict[str, np.ndarray]:
    """(B,) values of each named score under the image resamples ``counts`` (B, N), over ``classes``
    (see ``scores_of``)."""
    return scores_of({s: resampled_sums(v, counts) for s, v in _sources(per_image, names).items()}, names, classes)


def jackknife_scores(per_image: Mapping[str, np.ndarray], names: tuple[str, ...],
                     classes: PerClass | None = None) -> dict[str, np.ndarray]:
    """(N,) values of each named score with one image left out, over ``classes`` (see ``scores_of``)."""
    loo = {s: v.sum(0, dtype=np.float64)[None] - v for s, v in _sources(per_image, names).items()}
    return scores_of(loo, names, classes)


def acceleration(*jackknives: np.ndarray) -> float:
    """BCa's acceleration from the leave-one-out values of one sample (or of each of several independent samples,
    Efron & Tibshirani 1993, 14.15): sum u^3 / (6 (sum u^2)^1.5) over u = (mean - value) / n of every sample
    (NaNs dropped); |a| <= 1/6. A sample whose values do not vary (beyond rounding), or with fewer than two
    defined, adds nothing; 0 when none varies."""
    parts = []
    for jackknife in jackknives:
        j = np.asarray(jackknife, dtype=np.float64)
        j = j[~np.isnan(j)]
        if j.size >= 2 and np.ptp(j) > 1e-12 * max(1.0, float(np.abs(j).max())):
            parts.append((j.mean() - j) / j.size)
    if not parts:
        return 0.0
    u = np.concatenate(parts)
    return float(np.sum(u ** 3) / (6 * np.sum(u ** 2) ** 1.5))


def _level_of(sorted_values: np.ndarray, x: float) -> tuple[int, int]:
    """(how many values are below ``x``, how many at or below it)."""
    return (int(np.searchsorted(sorted_values, x, "left")), int(np.searchsorted(sorted_values, x, "right")))


def bca_interval(values: np.ndarray, estimate: float, confidence: float, accel: float = 0.0) -> Interval:
    """The BCa interval of ``estimate`` from its bootstrap ``values`` (NaNs, undefined resamples, dropped) and the
    jackknife ``accel`` (``acceleration``); it contains ``estimate`` (see the module docstring), or is replaced by
    the reason: an undefined score, or an estimate outside the central ``confidence`` of its bootstrap."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[~np.isnan(v)]
    if v.size == 0 or estimate is None or math.isnan(estimate):
        return Interval(reason="the score is undefined on this split")
    b = v.size
    below, at_or_below = _level_of(v, estimate)
    p0 = (below + at_or_below) / (2 * b)  # the estimate's level: ties count half
    z = _NORMAL.inv_cdf(0.5 + confidence / 2)
    z0 = _NORMAL.inv_cdf(p0) if 0 < p0 < 1 else math.copysign(math.inf, p0 - 0.5)
    if abs(z0) > z:
        return Interval(reason=f"the estimate lies outside the central {confidence:.0%} of its bootstrap "
                               f"distribution (bias z0 = {z0:+.2f}): no trustworthy interval")
    levels = []
    for side in (-z, z):
        den = 1 - accel * (z0 + side)
        if den <= 0:
            return Interval(reason=f"BCa undefined at confidence {confidence} (acceleration {accel:.3f})")
        levels.append(_NORMAL.cdf(z0 + (z0 + side) / den))
    # the ranks of the endpoints: analytically levels[0] <= p0 <= levels[1]; the clamps to the estimate's side
    # only absorb float rounding at a tie
    lo = min(max(math.ceil(levels[0] * b), 1), at_or_below)
    hi = max(min(math.floor(levels[1] * b) + 1, b), below + 1)
    return Interval(float(v[lo - 1]), float(v[hi - 1]))


def bca_p(values: np.ndarray, estimate: float, accel: float = 0.0, null: float = 0.0) -> float:
    """Two-sided p-value of ``null`` that agrees with ``bca_interval``: the ``1 - confidence`` at which one of its
    endpoints reaches ``null`` (``null`` outside the BCa interval at ``confidence`` exactly when p < 1 - confidence,
    up to the resolution of B resamples). ``null``'s level counts ties half and is kept within
    [0.5 / (B + 1), 1 - 0.5 / (B + 1)] so that B resamples never claim p = 0. NaN without a defined estimate or
    resample, or when the estimate lies outside its bootstrap distribution."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[~np.isnan(v)]
    if v.size == 0 or estimate is None or math.isnan(estimate):
        return float("nan")
    b = v.size
    below, at_or_below = _level_of(v, estimate)
    p0 = (below + at_or_below) / (2 * b)
    if not 0 < p0 < 1:
        return float("nan")
    z0 = _NORMAL.inv_cdf(p0)
    below, at_or_below = _level_of(v, null)
    q = (below + at_or_below + 1) / (2 * (b + 1))
    w = _NORMAL.inv_cdf(q) - z0  # BCa maps nominal z to level Φ(z0 + (z0 + z) / (1 - a (z0 + z))): solved for z
    if 1 + accel * w <= 0:  # beyond every level BCa reaches: the smallest p that B resamples can give
        return 1 / (b + 1)
    beta = _NORMAL.cdf(w / (1 + accel * w) - z0)
    return float(min(1.0, 2 * min(beta, 1 - beta)))


def bootstrap_ci(per_image: Mapping[str, np.ndarray], resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0, names: tuple[str, ...] = CI_SCORES,
                 estimates: Mapping[str, float] | None = None) -> dict[str, Interval]:
    """BCa interval of each named dataset-level score, resampling images with replacement over the split's class
    set (module docstring).

    ``per_image``: ``{"confusion": (N, C, C), ...}`` (see ``SCORE_SOURCES``); ``estimates``: the scores the
    intervals must contain (default: computed from the summed counts). Same inputs and seed, same interval.
    """
    n = image_count(per_image)
    if n == 0:
        return {k: Interval(reason="no images") for k in names}
    classes = fixed_classes(per_image)
    own = scores_of(split_sums(per_image), names)
    values = resampled_scores(per_image, draw_counts(draw_indices(n, resamples, seed), n), names, classes)
    jack = jackknife_scores(per_image, names, classes)
    out = {}
    for k in names:
        if k not in values:
            out[k] = Interval(reason=f"no per-image {SCORE_SOURCES[k]} counts")
            continue
        given = (estimates or {}).get(k)
        estimate = float(own[k] if given is None else given)
        out[k] = bca_interval(values[k], estimate, confidence, acceleration(jack[k]))
    return out


def images_per_class(per_image: Mapping[str, np.ndarray]) -> np.ndarray:
    """(C,) how many images hold each class in their truth."""
    return (_confusion_marginals(per_image)[:, 1] > 0).sum(0)


def rare_classes(per_image: Mapping[str, np.ndarray], name: str, min_images: int) -> dict[int, int]:
    """``{class: images}`` of the classes that the class-mean score ``name`` averages over on this split (its
    class set) and that fewer than ``min_images`` images hold in their truth."""
    if name not in CLASS_MEANS:
        return {}
    classes = fixed_classes(per_image)
    if name not in classes:
        return {}
    counts = images_per_class(per_image)
    return {int(c): int(counts[c]) for c in np.flatnonzero(classes[name][1]) if counts[c] < min_images}


def class_reason(per_image: Mapping[str, np.ndarray], name: str, min_images: int) -> str | None:
    """Why ``name`` (a class-mean score) has no trustworthy interval on this split: the classes of its class set
    that fewer than ``min_images`` (``stats.min_images_per_class``) images hold in their truth; None if none."""
    rare = rare_classes(per_image, name, min_images)
    if not rare:
        return None
    shown = ", ".join(f"class {c}: {k}" for c, k in list(rare.items())[:4]) + (", ..." if len(rare) > 4 else "")
    return (f"{len(rare)} class{'es' if len(rare) > 1 else ''} in the truth of < "
            f"stats.min_images_per_class={min_images} images ({shown})")


def too_few(per_image: Mapping[str, np.ndarray], name: str, stats: Mapping[str, Any]) -> str | None:
    """Why the split cannot give ``name`` a trustworthy interval (``stats.bootstrap``, ``stats.min_images``,
    ``stats.min_images_per_class``), or None."""
    n = image_count(per_image)
    if int(stats.get("bootstrap", 1000)) < 1:
        return "stats.bootstrap=0: no intervals"
    if n < (least := int(stats.get("min_images", 10))):
        return f"{n} image{'s' if n != 1 else ''} < stats.min_images={least}"
    return class_reason(per_image, name, int(stats.get("min_images_per_class", 3)))


def ci_method(stats: Mapping[str, Any]) -> str:
    """The interval method in words, as ``metrics.json`` names it beside ``ci``."""
    return (f"{float(stats.get('confidence', 0.95)):.0%} BCa bootstrap over images "
            f"({int(stats.get('bootstrap', 1000))} resamples, seed {int(stats.get('seed', 0))}); class-mean scores "
            "over the split's classes, a class a resample misses counted at its split value")


def interval_fields(per_image: Mapping[str, np.ndarray], stats: Mapping[str, Any] | None = None,
                    estimates: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``metrics.json`` fields of one split's intervals: ``ci`` (``{score: [lo, hi]}``, None for a score
    without one), ``ci_method`` and ``ci_na`` (``{score: why it has no interval}``), from the split's per-image
    arrays and the ``stats`` node (``conf/stats/default.yaml``). ``estimates``: the split's reported scores,
    which the intervals contain."""
    stats = stats or {}
    reasons = {k: r for k in CI_SCORES if (r := too_few(per_image, k, stats))}
    wanted = tuple(k for k in CI_SCORES if k not in reasons)
    intervals = bootstrap_ci(per_image, int(stats.get("bootstrap", 1000)), float(stats.get("confidence", 0.95)),
                             int(stats.get("seed", 0)), wanted, estimates) if wanted else {}
    reasons.update({k: i.reason for k, i in intervals.items() if i.reason})
    return {"ci": {k: intervals[k].bounds() if k in intervals else None for k in CI_SCORES},
            "ci_method": ci_method(stats), "ci_na": {k: reasons[k] for k in CI_SCORES if k in reasons}}


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


def verdict_evidence(runs_group: int, runs_baseline: int, images: int, stats: Mapping[str, Any]) -> str | None:
    """Why a comparison may give no verdict: fewer than ``stats.min_runs`` runs in a group (``not enough runs (1 per
    group)``), fewer than ``stats.min_images`` test images (``not enough images (1)``), or both; None when it may."""
    reasons = []
    if min(runs_group, runs_baseline) < int(stats.get("min_runs", 2)):
        per = f"{runs_group} per group" if runs_group == runs_baseline else f"{runs_group} vs {runs_baseline}"
        reasons.append(f"not enough runs ({per})")
    if images < int(stats.get("min_images", 10)):
        reasons.append(f"not enough images ({images})")
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class Delta:
    """One score's difference between two groups of runs: the estimate, its interval and two-sided p."""

    estimate: float
    interval: Interval
    p: float


def pooled_sd(*groups: list[float]) -> float:
    """The pooled within-group sample std of several groups' values (0 without degrees of freedom)."""
    df = sum(len(g) - 1 for g in groups)
    if df < 1:
        return 0.0
    return float(np.sqrt(sum(np.sum((np.asarray(g) - np.mean(g)) ** 2) for g in groups) / df))


def compare_groups(group: list[Mapping[str, np.ndarray]], baseline: list[Mapping[str, np.ndarray]],
                   names: tuple[str, ...], resamples: int, seed: int, paired: bool,
                   confidence: float = 0.95) -> dict[str, Delta]:
    """Each named score's difference, group mean minus baseline mean, with its BCa interval and p-value.

    Each entry of ``group``/``baseline`` is one run's per-image arrays. A resample adds two sources of variation:
    - the test images, drawn with replacement as for the runs' own intervals (each run's scores over its split's
      class set), the same images for both groups when ``paired`` (the runs must hold the same ids in the same
      order), each group's on their own otherwise;
    - the seeds: the runs' pooled std times sqrt(1/R_g + 1/R_b) times a Student t draw with R_g + R_b - 2 degrees
      of freedom (none with one run per group). Two or three runs are too few to bootstrap: a bootstrap of R
      values keeps (R - 1)/R of their variance and has no tails: drawing the runs with replacement called 7-25 %
      of comparisons of identical configurations better or worse at alpha = 0.05 with two runs per group, this
      1-4 % (docs/statistics.md).
    The acceleration comes from the jackknife over images (paired: the same image left out of every run).
    """
    rng = np.random.default_rng(seed)
    n_g, n_b = image_count(group[0]), image_count(baseline[0])
    idx_g = rng.integers(0, n_g, size=(resamples, n_g))
    idx_b = idx_g if paired else rng.integers(0, n_b, size=(resamples, n_b))
    counts_g, counts_b = draw_counts(idx_g, n_g), draw_counts(idx_b, n_b)
    df = len(group) + len(baseline) - 2
    seed_draws = rng.standard_t(df, size=resamples) if df > 0 else np.zeros(resamples)
    classes_g, classes_b = [fixed_classes(r) for r in group], [fixed_classes(r) for r in baseline]
    boot_g = [resampled_scores(r, counts_g, names, c) for r, c in zip(group, classes_g, strict=True)]
    boot_b = [resampled_scores(r, counts_b, names, c) for r, c in zip(baseline, classes_b, strict=True)]
    jack_g = [jackknife_scores(r, names, c) for r, c in zip(group, classes_g, strict=True)]
    jack_b = [jackknife_scores(r, names, c) for r, c in zip(baseline, classes_b, strict=True)]
    own_g = [scores_of(split_sums(r), names) for r in group]
    own_b = [scores_of(split_sums(r), names) for r in baseline]
    out = {}
    for k in names:
        if not all(k in r for r in boot_g + boot_b):
            continue
        y_g, y_b = [float(r[k]) for r in own_g], [float(r[k]) for r in own_b]
        estimate = float(np.mean(y_g) - np.mean(y_b))
        seed_sd = pooled_sd(y_g, y_b) * np.sqrt(1 / len(y_g) + 1 / len(y_b))
        deltas = (np.mean([r[k] for r in boot_g], 0) - np.mean([r[k] for r in boot_b], 0)) + seed_sd * seed_draws
        mean_g, mean_b = np.mean([j[k] for j in jack_g], 0), np.mean([j[k] for j in jack_b], 0)
        accel = acceleration(mean_g - mean_b) if paired else acceleration(mean_g, -mean_b)
        out[k] = Delta(estimate, bca_interval(deltas, estimate, confidence, accel), bca_p(deltas, estimate, accel))
    return out


def verdict(delta: float, p_adjusted: float, alpha: float, metric: str) -> str:
    """``better``/``worse`` when the adjusted p is below ``alpha`` (direction by the metric: lower ECE is
    better), else ``not distinguishable``."""
    if not (p_adjusted < alpha) or delta == 0:
        return "not distinguishable"
    improved = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
    return "better" if improved else "worse"

