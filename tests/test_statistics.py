"""Per-image matrices, bootstrap intervals, Boundary IoU, ECE and Holm against independent hand computations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from segvoc.evaluation.boundary import boundary_counts, boundary_dilation, boundary_scores_from_counts, label_boundary
from segvoc.evaluation.calibration import calibration_bins, calibration_scores
from segvoc.evaluation.metrics import confusion_counts, scores_from_confusion
from segvoc.evaluation.per_image import PerImageRows, per_image_confusion
from segvoc.evaluation.statistics import (
    bootstrap_ci,
    compare_groups,
    draw_indices,
    ece_scores,
    holm,
    percentile_interval,
    two_sided_p,
    verdict,
)


def test_per_image_confusion_by_hand_and_sums_to_the_split_matrix():
    target = torch.tensor([[[0, 1], [255, 2]], [[2, 2], [0, 255]]])
    preds = torch.tensor([[[0, 2], [1, 2]], [[2, 0], [0, 1]]])
    m = per_image_confusion(preds, target, 3)
    # image 0: (0,0) (1,2) (2,2), the 255 pixel ignored; image 1: (2,2) (2,0) (0,0)
    assert m[0].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert m[1].tolist() == [[1, 0, 0], [0, 0, 0], [1, 0, 1]]
    assert m.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (3, 7, 9), generator=g)
    t[:, :2] = 255
    p = torch.randint(0, 5, (3, 7, 9), generator=g)
    assert torch.equal(per_image_confusion(p, t, 5).sum(0), confusion_counts(p, t, 5))


def test_per_image_rows_follow_the_split_order():
    rows = PerImageRows()
    rows.add(["c", "a"], confusion=torch.tensor([[3], [1]]))
    rows.add(["b"], confusion=torch.tensor([[2]]))
    ids, got = rows.gather(order=["a", "b", "c", "d"])  # "d" not scored (a partial pass)
    assert ids == ["a", "b", "c"]
    assert got["confusion"].ravel().tolist() == [1, 2, 3]


def _random_per_image(n: int, c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, size=(n, c, c))
    conf[:, :, c - 1] = 0  # the last class is never predicted ...
    conf[:, c - 1, :] = 0  # ... nor present: left out of the means, as in the metric
    boundary = rng.integers(0, 20, size=(n, 2, c))
    boundary[:, 1] += boundary[:, 0]  # union >= intersection
    return {"confusion": conf, "boundary": boundary}


def test_bootstrap_matches_a_plain_loop_with_the_same_seed():
    per_image = _random_per_image(n=23, c=4, seed=1)
    got = bootstrap_ci(per_image, resamples=200, confidence=0.9, seed=7)
    idx = draw_indices(23, 200, 7)
    loop: dict[str, list[float]] = {"miou": [], "pixel_acc": [], "mean_class_acc": [], "boundary_miou": []}
    for row in idx:
        matrix = sum(per_image["confusion"][i] for i in row)
        s = scores_from_confusion(torch.as_tensor(matrix))
        for k in ("miou", "pixel_acc", "mean_class_acc"):
            loop[k].append(s[k])
        b = sum(per_image["boundary"][i] for i in row)
        loop["boundary_miou"].append(boundary_scores_from_counts(torch.as_tensor(b))["boundary_miou"])
    for k, values in loop.items():
        lo, hi = np.percentile(values, [5, 95])
        assert got[k] == pytest.approx([lo, hi], abs=1e-12), k
    assert bootstrap_ci(per_image, 200, 0.9, 7) == got  # same inputs and seed, same interval
    assert bootstrap_ci(per_image, 200, 0.9, 8) != got


def test_percentile_interval_drops_undefined_resamples():
    assert percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 1.0) == [1.0, 3.0]
    assert percentile_interval(np.array([np.nan]), 0.95) == [None, None]


def _cv2_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """boundary-iou-api ``mask_to_boundary``, verbatim in substance."""
    h, w = mask.shape
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    new_mask_erode = cv2.erode(new_mask, np.ones((3, 3), dtype=np.uint8), iterations=d)
    mask_erode = new_mask_erode[1: h + 1, 1: w + 1]
    return mask - mask_erode


@pytest.mark.parametrize(("h", "w", "ratio"), [(17, 23, 0.02), (31, 9, 0.1), (40, 41, 0.05), (5, 7, 0.3)])
def test_boundary_matches_the_cv2_recipe_pixel_for_pixel(h, w, ratio):
    rng = np.random.default_rng(h * w)
    target = rng.integers(0, 4, size=(2, h, w)).astype(np.uint8)
    target[0, : h // 2, : w // 2] = 1    # a block touching two borders
    target[1, 2: h - 2, 3: w - 1] = 2    # touching the right border only
    target[1, h // 3, :] = 255           # an ignored line
    preds = rng.integers(0, 4, size=(2, h, w)).astype(np.uint8)
    d = boundary_dilation(h, w, ratio)
    assert d == max(1, int(round(ratio * np.sqrt(h * h + w * w))))
    got = label_boundary(torch.as_tensor(target), d).numpy()
    for k in range(2):
        for c in (0, 1, 2, 3, 255):
            want = _cv2_boundary((target[k] == c).astype(np.uint8), d).astype(bool)
            assert np.array_equal(got[k] & (target[k] == c), want), (k, c)
    counts = boundary_counts(torch.as_tensor(preds), torch.as_tensor(target), 4, ratio).numpy()
    for k in range(2):
        valid = target[k] != 255
        for c in range(4):
            bt = _cv2_boundary((target[k] == c).astype(np.uint8), d).astype(bool) & valid
            bp = _cv2_boundary((preds[k] == c).astype(np.uint8), d).astype(bool) & valid
            assert counts[k, 0, c] == (bt & bp).sum() and counts[k, 1, c] == (bt | bp).sum(), (k, c)


def test_boundary_of_a_full_mask_is_its_border_band():
    b = label_boundary(torch.zeros(1, 9, 11, dtype=torch.long), 2)[0]
    assert b[2:-2, 2:-2].sum() == 0 and b.sum() == 9 * 11 - 5 * 7


def test_boundary_scores_leave_out_empty_unions():
    s = boundary_scores_from_counts(torch.tensor([[1, 0, 2], [4, 0, 2]]))
    assert s["per_class_boundary_iou"] == [0.25, None, 1.0]
    assert s["boundary_miou"] == pytest.approx(0.625)


def test_ece_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, 7, generator=g) * 3
    log_probs = logits.log_softmax(1)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, 0] = 255
    bins = calibration_bins(log_probs, target, bins=15)
    table = bins.sum(0)
    probs = log_probs.exp()
    n_b, conf_b, correct_b = [0] * 15, [0.0] * 15, [0] * 15
    for k in range(2):
        for i in range(6):
            for j in range(7):
                if target[k, i, j] == 255:
                    continue
                conf, pred = float(probs[k, :, i, j].max()), int(probs[k, :, i, j].argmax())
                b = next(b for b in range(15) if conf <= (b + 1) / 15)  # bins (b/15, (b+1)/15]
                n_b[b] += 1
                conf_b[b] += conf
                correct_b[b] += int(pred == target[k, i, j])
    assert table[0].tolist() == n_b and table[2].tolist() == correct_b
    assert table[1].numpy() == pytest.approx(conf_b)
    n = sum(n_b)
    ece = sum(n_b[b] / n * abs(correct_b[b] / n_b[b] - conf_b[b] / n_b[b]) for b in range(15) if n_b[b])
    s = calibration_scores(table)
    assert s["ece"] == pytest.approx(ece)
    assert ece_scores(bins.numpy()).sum() == pytest.approx(  # per image, as the bootstrap computes it
        sum(calibration_scores(bins[k])["ece"] for k in range(2)))
    assert float(ece_scores(table.numpy())) == pytest.approx(ece)
    assert s["calibration"]["count"] == n_b


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_two_sided_p_and_verdicts():
    assert two_sided_p(np.zeros(10)) == 1.0
    assert two_sided_p(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(0.8)  # 2 * (1 + 1) / (1 + 4)
    assert two_sided_p(-np.ones(99)) == pytest.approx(0.02)  # never 0: 2 * (1 + 0) / (1 + 99)
    assert verdict(-0.1, 0.001, 0.05, "miou") == "worse"
    assert verdict(-0.1, 0.001, 0.05, "ece") == "better"
    assert verdict(0.3, 0.2, 0.05, "miou") == "not distinguishable"


def test_paired_bootstrap_separates_a_shift_and_not_noise():
    first = _random_per_image(30, 4, 0)
    base = []
    for seed in range(3):  # three "seeds": the same images, a little seed noise in the counts
        noise = np.random.default_rng(seed + 10).integers(0, 4, size=first["confusion"].shape)
        base.append({"confusion": first["confusion"] + noise * (first["confusion"] > 0), "boundary": first["boundary"]})
    same = [{k: v.copy() for k, v in r.items()} for r in base]
    worse = []
    for r in base:  # move a third of every image's correct pixels of class 0 to class 1
        r = {k: v.copy() for k, v in r.items()}
        moved = r["confusion"][:, 0, 0] // 3
        r["confusion"][:, 0, 0] -= moved
        r["confusion"][:, 0, 1] += moved
        worse.append(r)
    d_same = compare_groups(same, base, ("miou",), 300, 0, paired=True)["miou"]
    assert two_sided_p(d_same) > 0.3  # the seeds of each group are drawn on their own: only seed noise remains
    one = compare_groups(same[:1], base[:1], ("miou",), 300, 0, paired=True)["miou"]
    assert np.all(one == 0)  # one run each, same images drawn for both: exactly no difference
    d_worse = compare_groups(worse, base, ("miou",), 300, 0, paired=True)["miou"]
    assert np.mean(d_worse) < 0 and two_sided_p(d_worse) < 0.01
