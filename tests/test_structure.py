"""The shape of the package: entry points are thin and nothing imports them."""

from __future__ import annotations

import ast
import subprocess
import sys

from segvoc.config import REPO_ROOT

ENTRY_POINTS = {"segvoc.train", "segvoc.evaluate", "segvoc.predict", "segvoc.export", "segvoc.report", "segvoc.bench",
                "segvoc.demo", "segvoc.data.check", "segvoc.data.prepare"}


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_module_imports_an_entry_point():
    offenders = []
    for path in sorted((REPO_ROOT / "segvoc").rglob("*.py")):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        bad = sorted(_imports(path) & (ENTRY_POINTS - {module}))
        if bad:
            offenders.append(f"{module} imports {', '.join(bad)}")
    assert not offenders, offenders


def test_importing_segvoc_changes_no_global_state():
    """No warning filters, logging filters, OpenCV thread count or matplotlib backend are set by ``import``."""
    code = """
import logging, warnings, cv2, matplotlib
import albumentations, hydra, matplotlib.figure, pytorch_lightning, rich.progress, torch, torchmetrics, torchvision
import hydra.core.override_parser.overrides_parser, pytorch_lightning.loggers, torch.utils.tensorboard
filters, threads, backend = list(warnings.filters), cv2.getNumThreads(), matplotlib.get_backend()
import segvoc.builders, segvoc.data.io, segvoc.visualize, segvoc.task, segvoc.train, segvoc.report
assert list(warnings.filters) == filters, 'warning filters changed'
assert cv2.getNumThreads() == threads, 'cv2 threads changed'
assert matplotlib.get_backend() == backend, 'matplotlib backend changed'
assert not logging.getLogger('pytorch_lightning.utilities.rank_zero').filters, 'logging filter added'
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
