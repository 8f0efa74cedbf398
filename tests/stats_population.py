"""A known population of per-image confusion matrices with VOC-like class frequencies, for measuring the
bootstrap's coverage and the comparisons' error rates (tests/test_statistics.py, tests/test_comparison.py).

Each image holds background and each of the 20 object classes with about its image frequency in VOC 2012 val
(person in 30 % of images, sheep in 4 %); an object covers a Beta-distributed share of the image. A "run" (one
trained model) labels a class's pixels right with a per-image rate whose mean depends on the class (rare, hard
classes lower), the image's difficulty for that class (shared by every run) and the run's own seed effect; the
missed pixels go to background or to the class's usual confuser, and some background pixels leak into the
image's objects or, now and then, into a class absent from the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# approximate image frequencies of VOC 2012 val (1,449 images): background, aeroplane ... tvmonitor
IMAGE_FREQ = np.array([1.0, 0.061, 0.045, 0.069, 0.044, 0.063, 0.048, 0.093, 0.080, 0.088, 0.043, 0.050, 0.081,
                       0.047, 0.051, 0.288, 0.049, 0.037, 0.055, 0.050, 0.052])
# mean per-pixel recall of a class on an image of average difficulty (logit scale below): chairs, tables,
# bicycles and plants hard, as for FCN-style models on VOC
SKILL = np.array([0.94, 0.80, 0.45, 0.75, 0.62, 0.60, 0.82, 0.75, 0.82, 0.40, 0.70, 0.50, 0.78, 0.72, 0.75, 0.80,
                  0.45, 0.72, 0.48, 0.78, 0.62])
CONFUSER = np.array([0, 0, 14, 0, 0, 0, 7, 6, 12, 11, 13, 9, 8, 10, 2, 0, 0, 10, 9, 0, 0])  # where misses go
NUM_CLASSES = 21
PIXELS = 20_000  # valid pixels per image (VOC images have ~180,000; only ratios matter)


@dataclass(frozen=True)
class TestSet:
    """The truth of ``n`` images: object areas (n, C) in pixels (0: absent; column 0 is background) and each
    image's difficulty per class (n, C), on the logit scale."""

    areas: np.ndarray
    difficulty: np.ndarray


def sample_test_set(rng: np.random.Generator, n: int) -> TestSet:
    """``n`` images drawn from the population."""
    present = rng.random((n, NUM_CLASSES)) < IMAGE_FREQ
    empty = ~present[:, 1:].any(1)  # every VOC image holds an object: the most frequent class if none was drawn
    present[empty, 15] = True
    share = rng.beta(1.2, 4.0, size=(n, NUM_CLASSES)) * present
    share[:, 0] = 0
    share = share / np.maximum(1.0, share.sum(1, keepdims=True) / 0.8)  # objects cover at most 80 %
    areas = np.round(share * PIXELS).astype(np.int64)
    areas[:, 0] = PIXELS - areas[:, 1:].sum(1)
    return TestSet(areas, rng.normal(0.0, 1.2, size=(n, NUM_CLASSES)))


def run_confusion(rng: np.random.Generator, test: TestSet, shift: float = 0.0, seed_sd: float = 0.15,
                  noise: float = 12.0) -> np.ndarray:
    """(n, C, C) int64 per-image confusion matrices (rows = truth) of one run on ``test``: the run's per-class
    seed effect ~ N(0, ``seed_sd``) and ``shift`` (a better or worse configuration) on the logit scale, its
    per-image rates Beta-distributed around the mean with concentration ``noise``."""
    n = test.areas.shape[0]
    logit = np.log(SKILL / (1 - SKILL)) + shift + rng.normal(0.0, seed_sd, size=NUM_CLASSES)
    mean = 1 / (1 + np.exp(-(logit + test.difficulty)))
    rate = rng.beta(noise * mean, noise * (1 - mean))
    conf = np.zeros((n, NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    rows = np.arange(n)
    for c in range(1, NUM_CLASSES):
        area = test.areas[:, c]
        hit = np.round(area * rate[:, c]).astype(np.int64)
        to_confuser = np.round((area - hit) * 0.3).astype(np.int64)
        conf[:, c, c] += hit
        conf[:, c, CONFUSER[c]] += to_confuser
        conf[:, c, 0] += area - hit - to_confuser
    objects = test.areas[:, 1:] > 0
    leak = np.round(test.areas[:, 0] * (1 - rate[:, 0]) * 0.5).astype(np.int64)  # background bleeding into objects
    per_object = leak // np.maximum(objects.sum(1), 1)
    conf[:, 0, 1:] += objects * per_object[:, None]
    stray = rng.random(n) < 0.08  # a blob of a class absent from the image
    cls = rng.integers(1, NUM_CLASSES, size=n)
    blob = np.where(stray & ~objects[rows, cls - 1], np.round(rng.uniform(0.002, 0.02, n) * PIXELS), 0).astype(
        np.int64)
    conf[rows, 0, cls] += blob
    conf[:, 0, 0] = test.areas[:, 0] - conf[:, 0, 1:].sum(1)
    return conf
