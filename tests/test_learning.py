"""The baseline really learns: it overfits the two real VOC train images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from segvoc.data.voc import VOCPairs
from segvoc.engine.task import SegmentationTask
from segvoc.evaluation.metrics import confusion_counts, scores_from_confusion
from segvoc.losses.segmentation import CrossEntropy
from segvoc.models import FCNBaseline


@pytest.mark.slow
def test_baseline_overfits_two_real_images(voc_mini):
    ds = VOCPairs(voc_mini, ["2007_000032", "2007_000039"])
    images, masks = [], []
    for k in range(len(ds)):
        image, mask = ds.load(k)
        images.append(cv2.resize(image, (160, 128), interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(mask, (160, 128), interpolation=cv2.INTER_NEAREST))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(masks))
    torch.manual_seed(0)
    task = SegmentationTask(FCNBaseline(), CrossEntropy(21), optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3})
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    task.train()
    for _ in range(300):
        opt.zero_grad()
        loss = task.criterion(task(x), y)
        loss.backward()
        opt.step()
    task.eval()
    with torch.no_grad():
        pred = task(x).argmax(1)
    s = scores_from_confusion(confusion_counts(pred, y, 21))
    background_only = scores_from_confusion(confusion_counts(torch.zeros_like(y), y, 21))
    assert background_only["pixel_acc"] > 0.85  # why pixel accuracy alone proves nothing here
    assert s["miou"] >= 0.8, s
    assert s["pixel_acc"] >= 0.98, s
