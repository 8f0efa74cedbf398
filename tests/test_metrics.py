"""The confusion-matrix metric against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from segvoc.data.statistics import class_statistics
from segvoc.evaluation.metrics import ConfusionMatrix, confusion_counts, scores_from_confusion
from segvoc.losses.weighting import class_weights


def test_confusion_counts_by_hand():
    # 4 classes; class 3 is absent from both truth and prediction; 255 pixels are ignored
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    m = confusion_counts(preds, target, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(m, expected)
    s = scores_from_confusion(m)
    # IoU0 = 1/(2+2-1) = 1/3; IoU1 = 2/(2+3-2) = 2/3; IoU2 = 1/(2+1-1) = 1/2; class 3 excluded (empty union)
    assert s["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)  # ignored pixels are not counted
    assert s["mean_class_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_class_only_predicted_counts_as_zero_iou():
    target = torch.tensor([0, 0, 0, 0])
    preds = torch.tensor([0, 0, 0, 2])
    s = scores_from_confusion(confusion_counts(preds, target, 3))
    assert s["per_class_iou"] == [pytest.approx(0.75), None, 0.0]
    assert s["miou"] == pytest.approx(0.375)


def test_metric_accumulates_over_batches_and_takes_logits():
    metric = ConfusionMatrix(num_classes=3)
    t1, t2 = torch.tensor([[0, 1]]), torch.tensor([[[2, 255]]])
    metric.update(torch.tensor([[0, 1]]), t1)
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2] = 1.0  # predicts class 2 everywhere
    metric.update(logits, t2)
    assert torch.equal(metric.compute(), torch.eye(3, dtype=torch.long))
    metric.reset()
    assert metric.compute().sum() == 0


def test_empty_matrix_is_nan_not_crash():
    s = scores_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_acc"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_matches_cpu():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (2, 50, 60), generator=g)
    target[:, :5] = 255
    preds = torch.randint(0, 21, (2, 50, 60), generator=g)
    assert torch.equal(confusion_counts(preds.cuda(), target.cuda(), 21).cpu(), confusion_counts(preds, target, 21))


def _tiny_masks(tmp_path):
    import numpy as np

    from segvoc.data.io import save_palette_mask
    from segvoc.data.palette import ClassSet

    a = np.array([[0, 0, 0, 0], [0, 0, 1, 255]], dtype=np.uint8)  # 6 bg, 1 aeroplane; 7 labelled pixels
    b = np.array([[0, 0, 1, 1], [2, 2, 2, 255]], dtype=np.uint8)  # 2 bg, 2 aeroplane, 3 bicycle; 7 labelled
    save_palette_mask(a, tmp_path / "a.png")
    save_palette_mask(b, tmp_path / "b.png")
    return class_statistics([tmp_path / "a.png", tmp_path / "b.png"],
                            ClassSet(("background", "aeroplane", "bicycle", "bird")))


def test_class_statistics_by_hand(tmp_path):
    stats = _tiny_masks(tmp_path)
    assert stats.counts.tolist() == [8, 3, 3, 0]
    # background and aeroplane appear in both images (7 + 7 labelled pixels), bicycle only in b (7)
    assert stats.image_pixels.tolist() == [14, 14, 7, 0]


def test_class_statistics_count_labels_beyond_voc_with_more_classes(tmp_path):
    """A 30-class dataset's label 25 is counted (the mask check takes the dataset's class count, not VOC's 21)."""
    import numpy as np

    from segvoc.data.io import save_palette_mask
    from segvoc.data.palette import ClassSet

    save_palette_mask(np.array([[0, 25, 25], [29, 255, 0]], dtype=np.uint8), tmp_path / "m.png")
    stats = class_statistics([tmp_path / "m.png"], ClassSet(tuple(f"c{i}" for i in range(30))))
    assert stats.counts.tolist() == [2] + [0] * 24 + [2, 0, 0, 0, 1]


# N = 14 labelled pixels, K = 3 present classes, n = (8, 3, 3, 0); absent class 3 always gets 0
HAND = {
    "inverse_frequency": [14 / 24, 14 / 9, 14 / 9, 0.0],
    "sqrt_inverse": [math.sqrt(14 / 24), math.sqrt(14 / 9), math.sqrt(14 / 9), 0.0],
    "enet": [1 / math.log(1.02 + 8 / 14), 1 / math.log(1.02 + 3 / 14), 1 / math.log(1.02 + 3 / 14), 0.0],
    # f = (8/14, 3/14, 3/7); median f = 3/7: w = (3/7)/f
    "median_frequency": [(3 / 7) / (8 / 14), (3 / 7) / (3 / 14), 1.0, 0.0],
}


@pytest.mark.parametrize("scheme", sorted(HAND))
def test_class_weight_schemes_by_hand(tmp_path, scheme):
    stats = _tiny_masks(tmp_path)
    assert class_weights(scheme, stats).tolist() == pytest.approx(HAND[scheme])
    scaled = class_weights(scheme, stats, background_scale=80)
    assert scaled[0] == pytest.approx(80 * HAND[scheme][0]) and scaled[1:].tolist() == pytest.approx(HAND[scheme][1:])


def test_no_weighting_and_unknown_scheme(tmp_path):
    from segvoc.errors import ConfigError

    stats = _tiny_masks(tmp_path)
    assert class_weights("none", stats) is None
    assert class_weights("none", stats, background_scale=0.5).tolist() == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="loss.class_weights='inverse': use one of none, inverse_frequency"):
        class_weights("inverse", stats)
