"""The failure gallery of a report: the test images on which the best group's best run scores lowest.

The images are picked from the run's ``per_image_test.npz`` (per-image mIoU over the classes in that image's truth
or prediction, as ``per_image_test.csv``), lowest first, and only they are run again through the run's checkpoint.
Each row of ``failure_gallery.png`` is image | truth | prediction | overlay, titled by id, per-image mIoU and the
image's top confused class pair (the largest off-diagonal entry of its confusion matrix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segvoc.evaluation.statistics import confusion_scores
from segvoc.runs.directory import read_per_image
from segvoc.runs.seed_groups import SeedGroup
from segvoc.tables import markdown_table

log = logging.getLogger("segvoc.report")

GALLERY_PNG = "failure_gallery.png"


@dataclass(frozen=True)
class Confused:
    """Truth class ``truth`` predicted as ``pred`` on ``pixels`` pixels."""

    truth: int
    pred: int
    pixels: int

    def text(self, class_names: Sequence[str]) -> str:
        return f"{class_names[self.truth]} → {class_names[self.pred]} ({self.pixels} px)"


@dataclass(frozen=True)
class GalleryItem:
    id: str
    miou: float
    confused: Confused | None

    def row_title(self, class_names: Sequence[str]) -> str:
        pair = self.confused.text(class_names) if self.confused else "no confusion"
        return f"{self.id}\nmIoU {self.miou:.3f}\n{pair}"


def top_confusion(matrix: np.ndarray) -> Confused | None:
    """The largest off-diagonal entry of one (C, C) matrix (rows = truth), the first in row-major order on a tie;
    None when every pixel is right."""
    m = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(m, 0)
    k = int(np.argmax(m))
    truth, pred = divmod(k, m.shape[1])
    return Confused(truth, pred, int(m[truth, pred])) if m[truth, pred] > 0 else None


def worst_images(ids: Sequence[str], confusion: np.ndarray, n: int) -> list[GalleryItem]:
    """The ``n`` images of lowest per-image mIoU, lowest first (ties in the split's order); images without a score
    (every pixel ignored) are left out."""
    miou = confusion_scores(confusion)["miou"]
    scored = np.flatnonzero(~np.isnan(miou))
    order = scored[np.argsort(miou[scored], kind="stable")][: max(n, 0)]
    return [GalleryItem(str(ids[k]), float(miou[k]), top_confusion(confusion[k])) for k in order]


def gallery_run(groups: Sequence[SeedGroup], split: str = "test") -> tuple[SeedGroup, Path] | None:
    """The best group (highest mean ``split`` mIoU over its runs) among those with a run holding per-image scores and
    a checkpoint, and that group's best such run; None when no run qualifies."""
    def usable(run: Path) -> bool:
        return (run / f"per_image_{split}.npz").is_file() and (run / "checkpoints" / "best.ckpt").is_file()

    def miou(metrics: dict) -> float:
        value = (metrics.get(split) or {}).get("miou")
        return float("-inf") if value is None else float(value)

    best: tuple[float, SeedGroup, Path] | None = None
    for g in groups:
        runs = [(miou(m), r) for r, m in zip(g.runs, g.metrics, strict=True) if usable(r)]
        values = g.values(split, "miou")
        if not runs or not values:
            continue
        score = float(np.mean(values))
        if best is None or score > best[0]:
            best = (score, g, max(runs, key=lambda x: x[0])[1])  # max keeps the first run on a tie
    return None if best is None else (best[1], best[2])


def checkpoint_predictor(run: Path, split: str, device: str = "cpu"
                         ) -> tuple[Any, Callable[[np.ndarray], np.ndarray], Any]:
    """The run's ``split`` dataset (from its own data config), a function predicting one of its images at full size
    with the run's best checkpoint (``predict_mask``, as evaluation does), and the run's task (its classes' names
    and colours: ``class_names``, ``palette``)."""
    import torch

    from segvoc.engine.builders import build_datamodule, load_task
    from segvoc.evaluation.inference import predict_mask

    task, cfg = load_task(run / "checkpoints" / "best.ckpt")
    task.to(device)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test" if split == "test" else "validate")

    def predict(image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return predict_mask(task.predict_log_probs, image, device)

    return dm.datasets[split], predict, task


def rerun_images(run: Path, image_ids: Sequence[str], split: str = "test", device: str = "cpu"
                 ) -> tuple[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], Any]:
    """(id, image, truth, prediction) of the given ids of ``split``, predicted by the run's best checkpoint at each
    image's own size (ids missing from the split, the data changed since, are skipped), and the run's task."""
    ds, predict, task = checkpoint_predictor(run, split, device)
    position = {i: k for k, i in enumerate(ds.ids)}
    out = []
    for i in image_ids:
        if i not in position:
            log.warning("failure gallery: %s is not in the %s split of %s's data; skipped", i, split, run)
            continue
        image, truth = ds.load(position[i])
        out.append((i, image, truth, predict(image)))
    return out, task


def failure_gallery(groups: Sequence[SeedGroup], output: Path, n: int, device: str = "cpu") -> str:
    """Write ``failure_gallery.png`` (the ``n`` worst test images of the best group's best run, in its dataset's
    class names and colours) into ``output``; returns the ``results.md`` section (or a line saying why there is
    none). ``n <= 0``: no section."""
    from segvoc.evaluation.figures import prediction_figure

    if n <= 0:
        return ""
    head = "\n## Failure gallery\n\n"
    picked = gallery_run(groups)
    if picked is None:
        return head + ("No gallery: no run holds both `per_image_test.npz` and `checkpoints/best.ckpt`.\n")
    group, run = picked
    ids, rows = read_per_image(run, "test")
    items = worst_images(ids, rows["confusion"], n)
    rows_reran, task = rerun_images(run, [it.id for it in items], device=device)
    reran = {i: (image, truth, pred) for i, image, truth, pred in rows_reran}
    class_names = task.class_names
    items = [it for it in items if it.id in reran]
    if not items:
        return head + f"No gallery: none of the test images of `{run.name}` could be read again.\n"
    fig = prediction_figure([reran[it.id] for it in items], f"lowest per-image test mIoU: {group.label} ({run.name})",
                            [it.row_title(class_names) for it in items], class_names, palette=task.palette)
    fig.savefig(output / GALLERY_PNG, dpi=100)
    table = markdown_table(("id", "per-image mIoU", "top confused pair (truth → predicted)"),
                           [[it.id, f"{it.miou:.4f}", it.confused.text(class_names) if it.confused else "-"]
                            for it in items])
    return (head + f"The {len(items)} test images with the lowest per-image mIoU (over the classes in the image's "
            f"truth or prediction) for the best group, `{group.label}` (highest mean test mIoU), in its best run "
            f"`{run.name}`, run again through its checkpoint (`gallery: {n}` in `conf/report.yaml`).\n\n"
            + table + f"\n![failure gallery]({GALLERY_PNG})\n")
