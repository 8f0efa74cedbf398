"""Make the documentation's demo figures and tables from the output of ``make demo``, never by hand.

    python docs/make_figures.py outputs/demo/<stamp>

reads ``<stamp>/{train,evaluate,report}`` (what ``python -m segvoc.demo`` writes) and writes

- ``docs/images/demo-predictions.png``: the report's prediction grid (image | truth | prediction | overlay);
- ``docs/images/demo-confusion.png``: the report's test confusion matrix;
- ``docs/images/demo-failure-gallery.png``: the report's failure gallery;
- ``docs/snippets/demo-results.md``: the report's results table, the evaluated test scores with their intervals
  and the per-class test IoU (included into docs/getting-started.md).

Images are shrunk to at most ``MAX_WIDTH`` pixels and stored with a 256-colour palette, so the figures stay small in
the repository (``MAX_TOTAL_BYTES`` in all; the script fails above it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent
MAX_WIDTH = 1100
MAX_TOTAL_BYTES = 2_000_000
FIGURES = {  # docs/images/<name> <- the report's file (a glob, relative to <stamp>/report)
    "demo-predictions.png": "*_predictions.png",
    "demo-confusion.png": "*_confusion.png",
    "demo-failure-gallery.png": "failure_gallery.png",
}
SCORES = ("miou", "pixel_acc", "mean_class_acc", "boundary_miou")


def one(folder: Path, pattern: str) -> Path:
    """The single file of ``folder`` matching ``pattern``."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one {pattern}, found {len(found)}; is it a make demo output?")
    return found[0]


def shrink(source: Path, target: Path) -> int:
    """``source`` at most ``MAX_WIDTH`` wide, as a 256-colour PNG at ``target``; returns its size in bytes."""
    image = Image.open(source).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(target, optimize=True)
    return target.stat().st_size


def section(markdown: str, title: str) -> str:
    """The body of the ``## <title>`` section of a Markdown file."""
    match = re.search(rf"^## {re.escape(title)}\n\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if not match:
        raise SystemExit(f"results.md: no section '## {title}'")
    return match.group(1).strip()


def interval(entry: dict, score: str) -> str:
    value = entry.get(score)
    if value is None:
        return "–"
    bounds = (entry.get("ci") or {}).get(score)
    if bounds:
        return f"{value:.4f} [{bounds[0]:.4f}, {bounds[1]:.4f}]"
    reason = (entry.get("ci_na") or {}).get(score)
    return f"{value:.4f}" + (f" (no interval: {reason})" if reason else "")


def results_snippet(demo: Path) -> str:
    """The Markdown included into the getting-started page."""
    results = (demo / "report" / "results.md").read_text()
    evaluated = json.loads((demo / "evaluate" / "metrics.json").read_text())["test"]
    trained = json.loads((demo / "train" / "metrics.json").read_text())
    card = (demo / "train" / "MODEL_CARD.md").read_text()
    version = re.search(r"segvoc[ *:|]+([0-9][\w.+-]*)", card)
    lines = [
        f"*The demo run of {demo.name.split('_')[0]} (segvoc {version.group(1) if version else 'unknown'}), made into "
        "this page by `docs/make_figures.py`.*",
        "",
        "From the report's `results.md` (the best checkpoint's val and test scores):",
        "",
        section(results, "Runs (best checkpoint)"),
        "",
        "From `segvoc.evaluate` on the test split, with the intervals in brackets "
        f"({evaluated.get('ci_method') or 'bootstrap over images'}):",
        "",
        "| score | test |",
        "|---|---|",
        *(f"| {s} | {interval(evaluated, s)} |" for s in SCORES),
        *([f"| ece | {evaluated['ece']:.4f} |"] if evaluated.get("ece") is not None else []),
        "",
        "Per-class test IoU (the classes the synthetic set draws, and background):",
        "",
    ]
    header = section(results, "Per-class test IoU").splitlines()[0]  # | run | background | aeroplane | ...
    classes = [c.strip() for c in header.strip("|").split("|")][1:]
    per_class = trained["test"].get("per_class_iou") or []
    rows = [(c, v) for c, v in zip(classes, per_class, strict=False) if v is not None]
    lines += ["| class | test IoU |", "|---|---|", *(f"| {c} | {v:.4f} |" for c, v in rows), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="a make demo output folder, outputs/demo/<stamp>")
    args = parser.parse_args(argv)
    report = args.demo / "report"
    if not report.is_dir():
        raise SystemExit(f"{args.demo}: no report/ folder; run make demo first")
    (DOCS / "images").mkdir(exist_ok=True)
    total = 0
    for name, pattern in FIGURES.items():
        total += shrink(one(report, pattern), DOCS / "images" / name)
    snippet = DOCS / "snippets" / "demo-results.md"
    snippet.parent.mkdir(exist_ok=True)
    snippet.write_text(results_snippet(args.demo))
    total_images = sum(p.stat().st_size for p in (DOCS / "images").glob("*") if p.is_file())
    print(f"wrote {len(FIGURES)} figures ({total / 1e3:.0f} kB; docs/images/ holds {total_images / 1e3:.0f} kB) and "
          f"{snippet.relative_to(DOCS.parent)}")
    if total_images > MAX_TOTAL_BYTES:
        sys.exit(f"docs/images/ holds {total_images} bytes, more than {MAX_TOTAL_BYTES}: shrink the figures")


if __name__ == "__main__":
    main()
