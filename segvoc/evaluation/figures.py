"""Pictures: mask overlays (with a legend of the classes present and their share), image | truth | prediction |
overlay figures (column titles, a legend of the classes shown, a title), confusion-matrix heat maps."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure

from segvoc.data.palette import IGNORE_INDEX, VOC_COLORMAP, colorize

PANELS = ("image", "truth", "prediction", "overlay")
# Background drawn in the figures' colour masks (VOC's own is black, which an all-background prediction turns into
# what looks like a missing panel): a pale blue-grey, far from every VOC colour (components 0/64/128/192; car is
# (128, 128, 128)) and from void's (224, 224, 192).
FIGURE_BACKGROUND = (196, 210, 228)
VOID_NAME = "void (255)"


def _black_background(palette: np.ndarray) -> bool:
    return not np.asarray(palette[0]).any()


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, palette: np.ndarray = VOC_COLORMAP) -> np.ndarray:
    """Blend an RGB uint8 image with the palette's colours of ``mask``; 255 and a black class 0 (VOC's background)
    stay as the image."""
    colors = colorize(mask, palette).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colors * alpha
    keep = (mask == IGNORE_INDEX) | ((mask == 0) & _black_background(palette))
    blend[keep] = image[keep]
    return blend.clip(0, 255).astype(np.uint8)


def figure_colors(mask: np.ndarray, palette: np.ndarray = VOC_COLORMAP) -> np.ndarray:
    """The palette's colours of a mask; a black class 0 (VOC's background) in ``FIGURE_BACKGROUND`` (visible, not a
    black hole)."""
    rgb = colorize(mask, palette)
    if _black_background(palette):
        rgb[mask == 0] = FIGURE_BACKGROUND
    return rgb


def class_color(c: int, palette: np.ndarray = VOC_COLORMAP) -> tuple[int, int, int]:
    """The colour class ``c`` has in the figures."""
    if c == 0 and _black_background(palette):
        return FIGURE_BACKGROUND
    return tuple(int(v) for v in palette[c])


DARK = 0.3  # relative luminance below which a class colour is hard to tell from another dark one (aeroplane, cat)


def is_dark(color: Sequence[int]) -> bool:
    """Whether an RGB colour (0-255) is dark enough to be outlined in white in the figures (``DARK``)."""
    r, g, b = (float(v) / 255 for v in color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b < DARK


def legend_classes(masks: Sequence[np.ndarray], num_classes: int) -> list[int]:
    """The classes appearing in any of ``masks``, in class order; 255 (void) last when some mask holds it."""
    present: set[int] = set()
    for m in masks:
        present |= {int(v) for v in np.unique(m)}
    return sorted(c for c in present if c < num_classes) + ([IGNORE_INDEX] if IGNORE_INDEX in present else [])


def _resized(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, width: int):
    h, w = truth.shape
    size = (width, max(1, round(h * width / w)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST),
            cv2.resize(pred, size, interpolation=cv2.INTER_NEAREST))


def prediction_figure(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], title: str = "",
                      row_titles: Sequence[str] | None = None, class_names: Sequence[str] = (),
                      width: int = 256, palette: np.ndarray = VOC_COLORMAP) -> Figure:
    """One row per (image, truth, prediction): image | truth | prediction | overlay, each resized to ``width``
    pixels wide; column titles on top, ``row_titles`` at the left, ``title`` above, and below a legend of the
    classes appearing in the truths and predictions shown (``legend_classes``). Panels are outlined, background is
    pale blue-grey (``FIGURE_BACKGROUND``); the regions of dark classes (``is_dark``) are outlined in white in the
    truth and prediction panels, and say so in the legend."""
    from matplotlib.patches import Patch

    rows = [_resized(*r, width) for r in rows]
    heights = [r[1].shape[0] / r[1].shape[1] for r in rows]
    panel = 2.2  # inches per panel width
    fig = Figure(figsize=(4 * panel + (1.4 if row_titles else 0.2), panel * sum(heights) + 1.4), layout="constrained")
    axes = fig.subplots(len(rows), 4, squeeze=False, gridspec_kw={"height_ratios": heights})
    shown = legend_classes([m for _, t, p in rows for m in (t, p)], len(class_names) or 255)
    dark = [c for c in shown if c != IGNORE_INDEX and is_dark(class_color(c, palette))]
    for r, (image, truth, pred) in enumerate(rows):
        pictures = (image, figure_colors(truth, palette), figure_colors(pred, palette),
                    overlay(image, pred, 0.5, palette))
        for k, (ax, picture) in enumerate(zip(axes[r], pictures, strict=True)):
            ax.imshow(picture, interpolation="nearest")
            for c in dark if k in (1, 2) else ():  # dark classes outlined in white: aeroplane is not cat
                region = (truth if k == 1 else pred) == c
                if region.any():
                    ax.contour(region, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(visible=True, color="0.2", linewidth=0.8)
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=8, rotation=0, ha="right", va="center")
    for ax, name in zip(axes[0], PANELS, strict=True):
        ax.set_title(name, fontsize=10)
    names = {**{c: str(c) for c in range(256)}, **dict(enumerate(class_names)), IGNORE_INDEX: VOID_NAME}
    handles = [Patch(facecolor=np.array(class_color(c, palette)) / 255,
                     label=names[c] + (" (outlined)" if c in dark else ""),
                     edgecolor="white" if c in dark else "0.2", linewidth=1.5 if c in dark else 0.8)
               for c in shown]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def confusion_view(matrix: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, list[str], int]:
    """The row-normalised matrix (rows = truth) of the classes present in the truth or the prediction, their names,
    and how many classes (absent from both) were dropped."""
    m = np.asarray(matrix, dtype=np.float64)
    keep = (m.sum(0) + m.sum(1)) > 0
    m = m[keep][:, keep]
    names = [n for n, k in zip(class_names, keep, strict=True) if k]
    return m / np.maximum(m.sum(1, keepdims=True), 1), names, int((~keep).sum())


CONFUSION_FONT = 10  # points: at the report's 110 dpi, digits about 11 px tall


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix (rows = truth) as a heat map of the classes present in the truth or the
    prediction (``confusion_view``); the subtitle says how many were left out. Cells are 0.55 in and numbers
    ``CONFUSION_FONT`` pt, whatever the number of classes."""
    norm, names, dropped = confusion_view(matrix, class_names)
    size = 2.2 + 0.55 * len(names)
    fig = Figure(figsize=(size + 1.2, size + 0.5), layout="constrained")  # object API: no pyplot state
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=CONFUSION_FONT)
    ax.set_yticks(range(len(names)), names, fontsize=CONFUSION_FONT)
    ax.set_xlabel("predicted", fontsize=CONFUSION_FONT)
    ax.set_ylabel("ground truth", fontsize=CONFUSION_FONT)
    for i in range(len(names)):
        for j in range(len(names)):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                        fontsize=CONFUSION_FONT, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    head = title or "confusion matrix (row-normalised)"
    if dropped:
        head += f"\n{dropped} classes absent from truth and prediction not shown"
    ax.set_title(head, fontsize=CONFUSION_FONT + 1)
    return fig


def legend_entries(mask: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
    """(class, share of the mask's pixels) of each class present, largest share first (ties in class order)."""
    counts = np.bincount(mask.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
    total = max(int(mask.size), 1)
    return sorted(((c, int(n) / total) for c, n in enumerate(counts) if n > 0), key=lambda e: (-e[1], e[0]))


def share_text(share: float) -> str:
    """A share as a percentage; a present class never reads 0.00 %."""
    return "<0.01 %" if 0 < share < 1e-4 else f"{100 * share:.2f} %"


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, alpha: float, class_names: Sequence[str],
                        palette: np.ndarray = VOC_COLORMAP) -> np.ndarray:
    """The blended overlay with a legend strip (colour swatch, class name, share of the pixels) for the classes
    present in ``mask`` (``legend_entries``), in the dataset's names and colours."""
    blended = overlay(image, mask, alpha, palette)
    present = legend_entries(mask, len(class_names))
    row_h = max(18, image.shape[0] // 25)
    labels = [f"{class_names[c]} {share_text(share)}" for c, share in present]
    text_w = max((cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, row_h / 36, 1)[0][0] for t in labels), default=0)
    legend = np.full((row_h * len(present) + 8, row_h + 16 + text_w, 3), 255, np.uint8)
    for k, ((c, _), label) in enumerate(zip(present, labels, strict=True)):
        y = 4 + k * row_h
        untinted = c == 0 and _black_background(palette)  # a black class 0 is not tinted in the overlay
        swatch = (255, 255, 255) if untinted else class_color(c, palette)
        cv2.rectangle(legend, (6, y + 2), (6 + row_h - 4, y + row_h - 2), list(swatch), -1)
        cv2.rectangle(legend, (6, y + 2), (6 + row_h - 4, y + row_h - 2), (60, 60, 60), 1)
        cv2.putText(legend, label, (row_h + 8, y + row_h - 5),
                    cv2.FONT_HERSHEY_SIMPLEX, row_h / 36, (0, 0, 0), 1, cv2.LINE_AA)
    h = max(blended.shape[0], legend.shape[0])
    canvas = np.full((h, blended.shape[1] + legend.shape[1], 3), 255, np.uint8)
    canvas[: blended.shape[0], : blended.shape[1]] = blended
    canvas[: legend.shape[0], blended.shape[1]:] = legend
    return canvas
