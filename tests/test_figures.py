"""Figures judged by their data: which classes a legend lists, which confusion rows are kept, which images the
failure gallery picks and in what order, which class pair an image confuses most."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segvoc.data.palette import VOC_COLORMAP
from segvoc.data.voc import VOC_CLASSES
from segvoc.evaluation.figures import (
    CONFUSION_FONT,
    FIGURE_BACKGROUND,
    PANELS,
    confusion_figure,
    legend_entries,
    overlay_with_legend,
    prediction_figure,
    share_text,
)
from segvoc.reporting.gallery import Confused, gallery_run, top_confusion, worst_images
from segvoc.runs.seed_groups import SeedGroup


def _rows():
    image = np.full((12, 16, 3), 90, np.uint8)
    truth = np.zeros((12, 16), np.uint8)
    truth[2:6, 2:8] = 8  # cat
    truth[0] = 255
    pred = np.zeros((12, 16), np.uint8)  # all background
    pred2 = truth.copy()
    pred2[8:10, 8:12] = 15  # person, only in a prediction
    return [(image, truth, pred), (image, truth, pred2)]


def test_prediction_figure_has_column_titles_title_and_a_legend_of_the_classes_shown():
    fig = prediction_figure(_rows(), "4a_baseline, seed 0 (run 3)", ["a", "b"], VOC_CLASSES)
    axes = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == list(PANELS)
    assert fig.get_suptitle() == "4a_baseline, seed 0 (run 3)"
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["a", "b"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "cat (outlined)", "person",
                                                                 "void (255)"]
    # an all-background prediction is drawn grey, not as a black (missing-looking) panel; every panel outlined
    shown = np.asarray(axes[0, 2].images[0].get_array())
    assert (shown == FIGURE_BACKGROUND).all() and not (shown == 0).all(-1).any()
    assert all(ax.spines["left"].get_visible() for ax in fig.axes)
    others = np.concatenate([VOC_COLORMAP[1: len(VOC_CLASSES)], VOC_COLORMAP[255:]]).astype(int)  # classes, void
    assert np.abs(others - np.array(FIGURE_BACKGROUND)).max(1).min() >= 32  # no class (car!) looks like background


def test_confusion_figure_drops_classes_absent_from_truth_and_prediction_and_says_so():
    m = np.zeros((21, 21), int)
    m[0, 0], m[0, 8], m[8, 8], m[8, 0] = 1000, 30, 200, 50
    m[15, 12] = 4  # person only in the truth, dog only in the prediction: both kept
    fig = confusion_figure(m, VOC_CLASSES, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["background", "cat", "dog", "person"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["background", "cat", "dog", "person"]
    assert ax.get_title() == "t\n17 classes absent from truth and prediction not shown"
    numbers = [t for t in ax.texts]
    assert sorted(t.get_text() for t in numbers) == ["0.03", "0.20", "0.80", "0.97", "1.00"]
    assert all(t.get_fontsize() >= 10 for t in numbers) and CONFUSION_FONT >= 10
    full = confusion_figure(np.eye(21, dtype=int) + 1, VOC_CLASSES).axes[0]
    assert len(full.get_yticklabels()) == 21 and "not shown" not in full.get_title()
    assert all(t.get_fontsize() >= 10 for t in full.texts)  # legible with every class too


def test_overlay_legend_lists_only_the_classes_present_with_their_share():
    mask = np.zeros((100, 100), np.uint8)
    mask[:10, :20] = 15  # 2 %
    mask[50, 50] = 3  # 0.01 %
    assert legend_entries(mask, 21) == [(0, 0.9799), (15, 0.02), (3, 0.0001)]
    assert [share_text(s) for _, s in legend_entries(mask, 21)] == ["97.99 %", "2.00 %", "0.01 %"]
    assert share_text(1 / 500_000) == "<0.01 %"  # a present class never reads 0.00 %
    image = np.zeros((100, 100, 3), np.uint8)
    small = overlay_with_legend(image[:20], np.zeros((20, 100), np.uint8) + (np.arange(100) >= 90) * 15, 0.5,
                                VOC_CLASSES)
    assert small.shape[0] == 18 * 2 + 8  # two legend rows (18 px each): background and person, nothing else


def test_top_confused_pair_is_the_largest_off_diagonal_entry():
    m = np.array([[50, 3, 9], [7, 0, 0], [9, 0, 40]])  # truth rows; 9 twice: the first in row-major order
    assert top_confusion(m) == Confused(0, 2, 9)
    assert top_confusion(np.diag([5, 6, 7])) is None
    assert Confused(8, 12, 40).text(VOC_CLASSES) == "cat → dog (40 px)"


def test_gallery_picks_the_lowest_per_image_miou_lowest_first():
    def image(tp_bg, fn_cat, tp_cat):  # background/cat matrix of one image
        m = np.zeros((3, 3), np.int64)
        m[0, 0], m[1, 0], m[1, 1] = tp_bg, fn_cat, tp_cat
        return m

    conf = np.stack([image(10, 0, 10),   # a: 1.0
                     image(10, 10, 0),   # b: (10/20 + 0) / 2 = 0.25
                     image(0, 0, 0),     # c: no pixel scored: left out
                     image(10, 5, 5),    # d: (10/15 + 5/10) / 2 = 0.5833
                     image(10, 10, 0)])  # e: 0.25, a tie with b: split order
    items = worst_images(["a", "b", "c", "d", "e"], conf, 3)
    assert [(i.id, round(i.miou, 4)) for i in items] == [("b", 0.25), ("e", 0.25), ("d", 0.5833)]
    assert items[0].confused == Confused(1, 0, 10)
    assert items[0].row_title(["bg", "cat", "dog"]) == "b\nmIoU 0.250\ncat → bg (10 px)"
    assert [i.id for i in worst_images(["a", "b", "c", "d", "e"], conf, 8)] == ["b", "e", "d", "a"]


def _gallery_dir(root: Path, name: str, miou: float, usable: bool = True) -> tuple[Path, dict]:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    metrics = {"test": {"miou": miou}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if usable:
        (run / "per_image_test.npz").touch()
        (run / "checkpoints" / "best.ckpt").touch()
    return run, metrics


@pytest.mark.parametrize("broken_best", [False, True])
def test_gallery_run_is_the_best_run_of_the_best_group(tmp_path, broken_best):
    a = [_gallery_dir(tmp_path, f"a{k}", m) for k, m in enumerate([0.50, 0.52])]  # mean 0.51
    b = [_gallery_dir(tmp_path, "b0", 0.40), _gallery_dir(tmp_path, "b1", 0.70, usable=not broken_best)]  # 0.55
    groups = [SeedGroup(label, [r for r, _ in runs], [m for _, m in runs], [0, 1])
              for label, runs in (("a", a), ("b", b))]
    group, run = gallery_run(groups)
    # group b has the higher mean; its best run is b1, unless b1 lacks the files (then b0, the only usable one)
    assert (group.label, run.name) == ("b", "b0" if broken_best else "b1")


def test_dark_classes_are_outlined_in_the_panels_and_say_so_in_the_legend():
    """Aeroplane (128, 0, 0) and cat (64, 0, 0) look alike: their regions get a white outline in the truth and
    prediction panels, light classes none, and the legend marks them."""
    from segvoc.evaluation.figures import is_dark

    image = np.full((20, 24, 3), 90, np.uint8)
    truth = np.zeros((20, 24), np.uint8)
    truth[2:8, 2:10], truth[10:16, 12:20] = 1, 8  # aeroplane, cat
    pred = truth.copy()
    pred[10:16, 12:20] = 15  # person (a light colour) where the cat is
    fig = prediction_figure([(image, truth, pred)], "t", class_names=VOC_CLASSES)
    assert is_dark(VOC_COLORMAP[1]) and is_dark(VOC_COLORMAP[8]) and not is_dark(VOC_COLORMAP[15])
    axes = fig.axes[:4]
    outlined = [len(ax.collections) for ax in axes]  # a contour set per dark class present in the panel
    assert outlined == [0, 2, 1, 0], outlined  # truth: aeroplane + cat; prediction: aeroplane; image, overlay: none
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["background", "aeroplane (outlined)", "cat (outlined)", "person"]


def test_report_figures_name_the_experiment_and_the_run_and_keep_the_legend_off_the_curves(tmp_path, monkeypatch):
    """A report of one run without a seed override: titles name the experiment, the seed and the run's folder,
    never "all runs, seed -"; the loss plot's legend lies outside its axes."""
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

    from segvoc.reporting.study import Run, figure_title, loss_curve_png

    run_dir = tmp_path / "2026-12-03_10-00-00_4a_baseline_ab12cd"
    w = SummaryWriter(str(run_dir / "tb"))
    for epoch in range(6):  # curves that run through the whole axes
        w.add_scalar("train/loss_epoch", 2.0 - 0.3 * epoch, epoch)
        w.add_scalar("val/loss", 2.1 - 0.3 * epoch, epoch)
        w.add_scalar("val/miou", 0.1 + 0.15 * epoch, epoch)
    w.close()
    run = Run(run_dir, {}, {"name": "4a_baseline", "seed": 42})
    assert figure_title(run, "all runs") == f"4a_baseline, seed 42 ({run_dir.name})"
    assert figure_title(run, "loss=dice") == f"4a_baseline, loss=dice, seed 42 ({run_dir.name})"
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    assert loss_curve_png(run, tmp_path / "loss.png")
    fig = drawn[0]
    fig.canvas.draw()  # (Agg) positions known
    ax = fig.axes[0]
    assert ax.get_title() == figure_title(run)
    unknown = Run(run_dir, {}, {"name": "4a_baseline"})  # a run whose config records no seed
    assert figure_title(unknown) == f"4a_baseline, seed unknown ({run_dir.name})"
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent()), "the legend covers the plot"
