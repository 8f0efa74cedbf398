"""The report of a sweep: its runs, their tables (results, seed groups, comparisons) and figures.

Reads each run's ``metrics.json``, ``.hydra/config.yaml``, ``confusion.json`` and TensorBoard scalars; writes
``results.md``/``results.csv`` (runs beside the report's published figures, plus per-class IoU), ``summary.csv`` and
``per_class_iou_by_group.png`` (runs that differ only in ``seed`` grouped: mean ± std),
``<run>_loss.png`` (Figures 1, 2, 4), ``<run>_predictions.png`` (Figures 3, 5), ``<run>_confusion.png`` and
``failure_gallery.png`` (``segvoc.reporting.gallery``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from segvoc.data.layouts import dataset_classes
from segvoc.errors import ConfigError
from segvoc.reporting.comparison import compare, comparison_csv, comparison_markdown
from segvoc.reporting.gallery import GALLERY_PNG, checkpoint_predictor, failure_gallery
from segvoc.runs.seed_groups import METRICS, SPLITS, SeedGroup, group_by_seed, mean_std, summary_rows
from segvoc.tables import fmt, markdown_table
from segvoc.utils import atomic_write_text

log = logging.getLogger("segvoc.report")

RESULT_COLUMNS = ("run", "experiment", "model", "loss_fn", "scheduler", "augment", "best_epoch", "val_loss",
                  "val_miou", "val_pixel_acc", "test_loss", "test_miou", "test_pixel_acc")


@dataclass
class Run:
    """One finished run directory."""

    path: Path
    metrics: dict[str, Any]
    cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.path.name}"

    @property
    def experiment(self) -> str:
        return str(self.cfg.get("name") or self.path.name)

    @property
    def class_names(self) -> list[str]:
        """The class names its per-class scores follow (``metrics.json``'s ``classes``; runs of segvoc 0.4 and
        earlier: VOC's)."""
        for split in ("test", "val"):
            names = (self.metrics.get(split) or {}).get("classes")
            if names:
                return list(names)
        n = len((self.metrics.get("test") or self.metrics.get("val") or {}).get("per_class_iou") or [None] * 21)
        return list(dataset_classes({"num_classes": min(n, 21)}).names)

    @property
    def seed(self) -> Any:
        """The run's seed (its stored config), None when unknown."""
        return self.cfg.get("seed")

    def group(self, key: str) -> str:
        """The option the run picked in config group ``key``."""
        return str((self.cfg.get("choices") or {}).get(key) or "-")

    def row(self) -> dict[str, Any]:
        v, t = self.metrics.get("val", {}), self.metrics.get("test", {})
        return {"run": self.label, "experiment": self.experiment, "model": self.group("model"),
                "loss_fn": self.group("loss"), "scheduler": self.group("scheduler"), "augment": self.group("augment"),
                "best_epoch": v.get("epoch", t.get("epoch")), "val_loss": v.get("loss"), "val_miou": v.get("miou"),
                "val_pixel_acc": v.get("pixel_acc"), "test_loss": t.get("loss"), "test_miou": t.get("miou"),
                "test_pixel_acc": t.get("pixel_acc")}


def find_runs(sweep: str | Sequence[str]) -> list[Run]:
    """Every directory holding ``metrics.json`` under the given folder(s), sorted by path."""
    roots = [sweep] if isinstance(sweep, str | Path) else list(sweep)
    found: list[Path] = []
    for r in roots:
        r = Path(r).expanduser()
        if not r.exists():
            raise ConfigError(f"sweep={r}: no such folder; pass a multirun dir, a run dir, or a list of them")
        found += [p.parent for p in r.rglob("metrics.json")] if not (r / "metrics.json").is_file() else [r]
    if not found:
        raise ConfigError(f"sweep={sweep}: no run with metrics.json found; did the runs finish?")
    runs = []
    for d in sorted(set(found)):
        runs.append(Run(d, json.loads((d / "metrics.json").read_text()), _run_fields(d)))
    return runs


REPORT_GROUPS = ("model", "loss", "scheduler", "augment", "experiment")


def _run_fields(run: Path) -> dict[str, Any]:
    """The run's name and group choices: from ``.hydra/hydra.yaml`` (``hydra.runtime.choices``, what Hydra
    recorded), else from the groups' ``name`` keys of ``.hydra/config.yaml`` (runs of segvoc 0.1)."""
    hydra_file, cfg_file = run / ".hydra" / "hydra.yaml", run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_file) if cfg_file.is_file() else OmegaConf.create()
    recorded = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices") if hydra_file.is_file() else None
    if recorded is not None:
        choices = {g: recorded.get(g) for g in REPORT_GROUPS}
    else:
        choices = {g: OmegaConf.select(cfg, f"{g}.name", throw_on_resolution_failure=False) for g in REPORT_GROUPS}
    name = cfg.get("name") if "name" in cfg and not OmegaConf.is_interpolation(cfg, "name") else None
    return {"name": name or choices.get("experiment") or choices.get("model"), "choices": choices,
            "seed": cfg.get("seed")}


def figure_title(run: Run, group: str | None = None) -> str:
    """A figure's title: the experiment, what sets the run's group apart (``group``, when it says more than the
    run), its seed, and its folder."""
    parts = [run.experiment]
    if group and group not in ("all runs", run.label, run.experiment):
        parts.append(group)
    parts.append(f"seed {run.seed}" if run.seed is not None else "seed unknown")
    return ", ".join(parts) + f" ({run.label})"


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[float]]:
    """Scalar series (in logging order) of the given tags from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[float, int, float]]] = {t: [] for t in tags}
    for ev in sorted((run_dir / "tb").glob("events.out.tfevents.*")) if (run_dir / "tb").is_dir() else []:
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
        acc.Reload()
        for t in tags:
            if t in acc.Tags().get("scalars", []):
                series[t] += [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)]
    return {t: [v for _, _, v in sorted(s)] for t, s in series.items()}


def loss_curve_png(run: Run, path: Path, title: str | None = None) -> bool:
    """Train and val loss per epoch (report Figures 1, 2, 4) and val mIoU on a second axis, titled by the run's
    group and seed (``title``); False when the run logged none."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = read_scalars(run.path, ("train/loss_epoch", "val/loss", "val/miou"))
    if not any(s.values()):
        return False
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for tag, label in (("train/loss_epoch", "train loss"), ("val/loss", "val loss")):
        if s[tag]:
            ax.plot(range(len(s[tag])), s[tag], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if s["val/miou"]:
        right = ax.twinx()
        right.plot(range(len(s["val/miou"])), s["val/miou"], marker="s", color="tab:green", label="val mIoU")
        right.set_ylabel("val mIoU")
        right.set_ylim(0, 1)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_title(title or figure_title(run))
    # below the axes, never over the curves
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(labels),
              frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def confusion_png(run: Run, split: str, path: Path) -> bool:
    """Row-normalised confusion heat map from the run's ``confusion.json``."""
    from segvoc.evaluation.figures import confusion_figure

    f = run.path / "confusion.json"
    if not f.is_file():
        return False
    mats = json.loads(f.read_text())
    if split not in mats:
        split = next(iter(mats))
    fig = confusion_figure(np.array(mats[split]), run.class_names,
                           title=f"{figure_title(run)}: {split}, row-normalised")
    fig.savefig(path, dpi=110)
    return True


def predictions_png(run: Run, num_images: int, path: Path, device: str = "cpu", title: str | None = None) -> bool:
    """Image | truth | prediction | overlay for the first validation images (report Figures 3, 5), with column
    titles, a legend of the classes shown and the run's label (``title``: its group and seed) as title."""
    from segvoc.evaluation.figures import prediction_figure

    if not (run.path / "checkpoints" / "best.ckpt").is_file() or num_images <= 0:
        return False
    ds, predict, task = checkpoint_predictor(run.path, "val", device)
    rows = []
    for k in range(min(num_images, len(ds))):
        image, truth = ds.load(k)
        rows.append((image, truth, predict(image)))
    label = f"{title or figure_title(run)}: validation images"
    prediction_figure(rows, label, class_names=task.class_names, palette=task.palette).savefig(path, dpi=100)
    return True


def run_caveats(runs: Sequence[Run]) -> list[str]:
    """The model card's caveats (``segvoc.runs.model_card.caveats``) of the runs, and ``debug=`` presets, each
    once with the number of runs it concerns."""
    from segvoc.runs.model_card import caveats

    counts: dict[str, int] = {}
    for r in runs:
        cfg_file = r.path / ".hydra" / "config.yaml"
        notes = []
        if cfg_file.is_file():
            cfg = OmegaConf.load(cfg_file)
            if "data" in cfg and "trainer" in cfg and "model" in cfg:
                notes += caveats(cfg)
        debug = OmegaConf.select(OmegaConf.load(h), "hydra.runtime.choices.debug") if (
            h := r.path / ".hydra" / "hydra.yaml").is_file() else None
        if debug:
            notes.append(f"debug={debug}: a debug preset (tiny data, few epochs); the scores only show the "
                         "pipeline runs.")
        for n in notes:
            counts[n] = counts.get(n, 0) + 1
    return [f"{n} ({k} of {len(runs)} runs)" for n, k in counts.items()]


def results_markdown(runs: Sequence[Run], published: dict[str, Any]) -> str:
    """The report-style results table with published figures beside, then per-class IoU; the runs' caveats
    first."""
    rows = [r.row() for r in runs]
    out = io.StringIO()
    out.write("# segvoc results\n\n")
    notes = run_caveats(runs)
    if notes:
        out.write("**Read with care:**\n\n" + "".join(f"- {n}\n" for n in notes) + "\n")
    out.write("## Runs (best checkpoint)\n\n")
    out.write(markdown_table(RESULT_COLUMNS, [[row[c] for c in RESULT_COLUMNS] for row in rows]))
    out.write("\n## Beside the report's published figures\n\n")
    cmp_rows = []
    for row in rows:
        pub = published.get(row["experiment"]) or {}
        cmp_rows.append([row["experiment"], row["val_miou"], pub.get("val_miou"), row["val_pixel_acc"],
                         pub.get("val_pixel_acc"), row["test_miou"], pub.get("test_miou"), row["test_pixel_acc"],
                         pub.get("test_pixel_acc"), pub.get("source", "-")])
    out.write(markdown_table(("experiment", "val mIoU", "report", "val pixel acc", "report", "test mIoU", "report",
                              "test pixel acc", "report", "report source"), cmp_rows))
    out.write("\n## Per-class test IoU\n\n")
    names = report_classes(runs)
    pc = [[r.label, *(r.metrics.get("test", {}).get("per_class_iou") or [None] * len(names))] for r in runs]
    out.write(markdown_table(("run", *names), pc))
    return out.getvalue()


def pm(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std) of a group's values; the mean alone for one value; ``-`` for none."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _natural(text: str) -> tuple:
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def report_classes(runs: Sequence[Run]) -> list[str]:
    """The class names of the report's tables: the runs' (``ConfigError`` when runs of different datasets are
    reported together)."""
    names = [r.class_names for r in runs]
    if any(n != names[0] for n in names):
        other = next(r for r, n in zip(runs, names, strict=True) if n != names[0])
        raise ConfigError(f"sweep=: {runs[0].path} and {other.path} score different classes; report the runs of one "
                          "dataset together")
    return names[0] if names else []


def groups_markdown(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> str:
    """Mean ± std over the seeds of each group of runs that differ only in ``seed``."""
    header = ("group", "n", "seeds", *(f"{s} {m}" for s in SPLITS for m in ("mIoU", "pixel acc", "mean class acc")))
    rows = [[g.label, g.n, ",".join(sorted((str(s) for s in g.seeds if s is not None), key=_natural)) or "-",
             *(pm(g.values(s, m)) for s in SPLITS for m in METRICS)] for g in groups]
    return ("\n## Groups: mean ± std over seeds (sample std, n-1)\n\n" + markdown_table(header, rows)
            + "\nPer-class test IoU (mean ± std over the group's runs):\n\n"
            + markdown_table(("group", *class_names),
                             [[g.label, *(pm(v, 2) for v in g.per_class("test"))] for g in groups]))


def summary_csv(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> str:
    """``summary.csv``: one row per group (see ``segvoc.runs.seed_groups.summary_rows``)."""
    rows = summary_rows(groups, class_names)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: fmt(v, 6) if isinstance(v, float) else ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def truth_classes(runs: Sequence[Path], split: str = "test") -> list[int] | None:
    """Classes with ground-truth pixels in ``split`` of any of the runs (``confusion.json`` rows); None when no run
    has the file."""
    present: set[int] = set()
    found = False
    for run in runs:
        f = run / "confusion.json"
        if f.is_file() and split in (mats := json.loads(f.read_text())):
            found = True
            present |= {c for c, row in enumerate(mats[split]) if sum(row) > 0}
    return sorted(present) if found else None


def per_class_by_group_png(groups: Sequence[SeedGroup], path: Path, class_names: Sequence[str]) -> bool:
    """Per-class test IoU by group: bars at the mean, whiskers of one std (what weighting buys and costs). Every
    class present in the test truth is shown, a total failure (IoU 0 in every group) marked with a red ``0``; the
    classes absent from the truth are named below the axis."""
    from matplotlib.figure import Figure

    per_class = [g.per_class("test") for g in groups]
    present = truth_classes([r for g in groups for r in g.runs])
    if present is None:  # runs without confusion.json: the classes some group scored
        present = [c for c in range(len(class_names)) if any(c < len(pc) and pc[c] for pc in per_class)]
    classes = present
    if not classes:
        return False
    fig = Figure(figsize=(min(16.0, max(6.0, 0.4 * len(classes) * len(groups) ** 0.5 + 2)), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for k, (g, pc) in enumerate(zip(groups, per_class, strict=True)):
        stats = [mean_std(pc[c]) if c < len(pc) else (None, None) for c in classes]
        means = [m if m is not None else 0.0 for m, _ in stats]
        errs = [s if s is not None else 0.0 for _, s in stats]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(classes))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"{g.label} (n={g.n})")
    failed = [i for i, c in enumerate(classes) if all(max(pc[c], default=0) == 0 for pc in per_class if c < len(pc))]
    for i in failed:
        ax.text(i, 0.01, "0", color="red", ha="center", va="bottom", fontweight="bold")
    ax.set_xticks(range(len(classes)), [class_names[c] for c in classes], rotation=45, ha="right")
    ax.set_ylabel("test IoU (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    absent = [class_names[c] for c in range(len(class_names)) if c not in classes]
    ax.set_title("Per-class test IoU by group (red 0: IoU 0 in every group)"
                 + (f"\nabsent from the test truth: {', '.join(absent)}" if absent else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)  # below the axes
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def build_report(sweep: str | Sequence[str], output: Path, published: dict[str, Any], num_images: int = 4,
                 confusion_split: str = "test", device: str = "cpu",
                 stats: dict[str, Any] | None = None, gallery: int = 0) -> dict[str, Any]:
    """Write tables and figures for the runs under ``sweep`` into ``output``; returns what was written.
    ``stats``: ``conf/stats`` (bootstrap, confidence, seed, alpha, baseline) for the paired comparisons;
    ``gallery``: how many worst test images of the best group the failure gallery shows (``conf/report.yaml``;
    0: none)."""
    runs = find_runs(sweep)
    output.mkdir(parents=True, exist_ok=True)
    groups = group_by_seed([r.path for r in runs], [r.metrics for r in runs])
    stats = stats or {}
    comparison = compare(groups, stats)
    link = ""
    if comparison is not None:
        atomic_write_text(output / "comparison.md", comparison_markdown(comparison, stats))
        atomic_write_text(output / "comparison.csv", comparison_csv(comparison))
        link = ("\n## Is the difference real?\n\nPaired bootstrap comparisons against the baseline group, "
                "Holm-adjusted: [comparison.md](comparison.md) ([comparison.csv](comparison.csv)).\n")
    failures = failure_gallery(groups, output, gallery, device)
    atomic_write_text(output / "results.md",
                      results_markdown(runs, published) + groups_markdown(groups, report_classes(runs)) + link
                      + failures)
    atomic_write_text(output / "summary.csv", summary_csv(groups, report_classes(runs)))
    buf = io.StringIO()
    names = report_classes(runs)
    writer = csv.DictWriter(buf, fieldnames=[*RESULT_COLUMNS, *(f"iou_{c}" for c in names)])
    writer.writeheader()
    for r in runs:
        per_class = r.metrics.get("test", {}).get("per_class_iou") or [None] * len(names)
        writer.writerow({**{k: fmt(v, 6) if isinstance(v, float) else v for k, v in r.row().items()},
                         **{f"iou_{c}": fmt(v, 6) for c, v in zip(names, per_class, strict=False)}})
    atomic_write_text(output / "results.csv", buf.getvalue())
    figures = []
    labels = {run: g.label for g in groups for run in g.runs}
    titles = {r.path: figure_title(r, labels.get(r.path)) for r in runs}
    for r in runs:
        for suffix, make in (("loss", lambda r, p: loss_curve_png(r, p, titles.get(r.path))),
                             ("confusion", lambda r, p: confusion_png(r, confusion_split, p)),
                             ("predictions", lambda r, p: predictions_png(r, num_images, p, device,
                                                                          titles.get(r.path)))):
            p = output / f"{r.label}_{suffix}.png"
            if make(r, p):
                figures.append(p.name)
    if per_class_by_group_png(groups, output / "per_class_iou_by_group.png", report_classes(runs)):
        figures.append("per_class_iou_by_group.png")
    if failures and (output / GALLERY_PNG).is_file():
        figures.append(GALLERY_PNG)
    log.info("report of %d runs in %d groups in %s", len(runs), len(groups), output)
    return {"runs": [str(r.path) for r in runs], "groups": [g.label for g in groups], "figures": figures,
            "comparison": comparison}
