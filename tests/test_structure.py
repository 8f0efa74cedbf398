"""The shape of the package: entry points on top, one folder per concern, imports that only go down, no circles."""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from segvoc.config import REPO_ROOT

ENTRY_POINTS = {"segvoc.train", "segvoc.evaluate", "segvoc.predict", "segvoc.export", "segvoc.report", "segvoc.demo",
                "segvoc.data.check", "segvoc.data.prepare"}
BASE = {"segvoc", "segvoc.config", "segvoc.errors", "segvoc.extras", "segvoc.utils", "segvoc.tables"}
# what each folder may import besides itself (docs, "Module map"); the base modules import only each other;
# segvoc.app (the failure policy and the preflight check around every command) serves the entry points only
MAY_IMPORT = {
    "safety": {"base"},
    "data": {"safety", "base"},
    "models": {"segvoc.errors", "segvoc.extras", "segvoc.utils"},
    "losses": {"data", "base"},
    "evaluation": {"data", "base"},
    "engine": {"models", "losses", "evaluation", "data", "safety", "base"},
    "runs": {"deploy", "engine", "models", "losses", "evaluation", "data", "safety", "base"},
    "deploy": {"engine", "models", "losses", "evaluation", "data", "safety", "base"},
    "reporting": {"runs", "engine", "models", "losses", "evaluation", "data", "safety", "base"},
    "app": {"runs", "engine", "models", "losses", "evaluation", "data", "safety", "deploy", "reporting", "base"},
    "base": {"base"},
    # measuring segvoc (python -m segvoc.bench): may use any folder; nothing else in segvoc imports it
    "bench": {"app", "reporting", "deploy", "runs", "engine", "models", "losses", "evaluation", "data", "safety",
              "base"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO_ROOT / "segvoc").rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every segvoc module ``path`` imports, at the top or inside a function."""
    known = set(_modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def _room(module: str) -> str:
    """The folder a module lives in (``base`` for the top-level helpers, ``entry`` for entry points)."""
    if module in ENTRY_POINTS:
        return "entry"
    if module == "segvoc.app":
        return "app"
    if module in BASE:
        return "base"
    parts = module.split(".")
    assert len(parts) >= 2 and parts[1] in MAY_IMPORT, f"{module}: not in a folder the module map names"
    return parts[1]


def _allowed(importer: str, imported: str) -> bool:
    room, target = _room(importer), _room(imported)
    if target == "bench":
        return room == "bench"
    if room == "entry":
        return target != "entry"
    if target == "entry":
        return False
    allowed = MAY_IMPORT[room] | {room}
    return target in allowed or imported in allowed


def test_every_module_has_a_room_and_imports_only_go_down():
    offenders = [f"{m} imports {i}" for m, p in _modules().items() for i in sorted(_imports(p))
                 if i != m and not _allowed(m, i)]
    assert not offenders, offenders


def test_the_rule_catches_an_upward_import(tmp_path):
    assert not _allowed("segvoc.data.voc", "segvoc.engine.task")
    assert not _allowed("segvoc.engine.task", "segvoc.runs.directory")
    assert not _allowed("segvoc.reporting.study", "segvoc.deploy.exported")
    assert not _allowed("segvoc.runs.sweep", "segvoc.train")
    assert not _allowed("segvoc.runs.lifecycle", "segvoc.app")
    assert not _allowed("segvoc.safety.ownership", "segvoc.runs.directory")
    assert _allowed("segvoc.deploy.exported", "segvoc.engine.builders")
    assert _allowed("segvoc.train", "segvoc.app")


def test_the_rule_keeps_the_measurement_tools_off_the_training_path():
    """``segvoc.bench`` may import every folder below it, and nothing else imports ``segvoc.bench``: not an entry
    point, not the base helpers, not a folder."""
    for importer in ("segvoc.train", "segvoc.engine.task", "segvoc.data.datamodule", "segvoc.app",
                     "segvoc.reporting.study"):
        assert not _allowed(importer, "segvoc.bench.syncs"), importer
    assert not _allowed("segvoc.bench.benchmark", "segvoc.train")
    assert _allowed("segvoc.bench.gpu_check", "segvoc.bench.throughput")
    for imported in ("segvoc.engine.builders", "segvoc.runs.directory", "segvoc.deploy.exported", "segvoc.config",
                     "segvoc.reporting.study"):
        assert _allowed("segvoc.bench.benchmark", imported), imported


def test_no_import_circles():
    graph = {m: {i for i in _imports(p) if i != m} for m, p in _modules().items()}
    # a package's __init__ is imported on the way to its modules; only explicit edges count
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_every_folder_says_what_lives_there():
    for init in sorted((REPO_ROOT / "segvoc").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) <= 3, f"{init}: needs a docstring of one or two lines"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "conf").rglob("*.yaml")), ids=lambda p: str(p.name))
def test_every_conf_target_points_at_a_real_object(path):
    from hydra.utils import get_object

    from segvoc.engine.checkpoint import MOVED_MODULES

    targets = [line.split(":", 1)[1].split("#")[0].strip() for line in path.read_text().splitlines()
               if line.strip().startswith("_target_:")]
    for target in targets:
        assert target.rpartition(".")[0] not in MOVED_MODULES, f"{path}: {target} names a module that moved"
        get_object(target)


def test_no_module_imports_an_entry_point():
    offenders = []
    for module, path in _modules().items():
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
import segvoc.engine.builders, segvoc.data.io, segvoc.evaluation.figures, segvoc.engine.task
import segvoc.train, segvoc.report
assert list(warnings.filters) == filters, 'warning filters changed'
assert cv2.getNumThreads() == threads, 'cv2 threads changed'
assert matplotlib.get_backend() == backend, 'matplotlib backend changed'
assert not logging.getLogger('pytorch_lightning.utilities.rank_zero').filters, 'logging filter added'
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_only_the_ownership_rule_deletes_folders():
    """Rule A has one place: deleting a folder and everything in it (``shutil.rmtree``, ``os.removedirs``, an ``rm``
    command) is done only by ``segvoc.safety.ownership``, which checks the folder's marker first."""
    deleting = re.compile(r"rmtree|removedirs|[\"']rm[\"' ]")
    offenders = [m for m, p in _modules().items()
                 if deleting.search(p.read_text()) and m != "segvoc.safety.ownership"]
    assert not offenders, offenders


def test_voc_class_names_live_only_in_the_voc_layout():
    """Issue "your own data": VOC's class names reach an output only through the VOC dataset description; every
    other module takes the dataset's names."""
    offenders = [m for m, p in _modules().items() if "VOC_CLASSES" in p.read_text() and m != "segvoc.data.voc"]
    assert not offenders, offenders


def test_the_resolvers_are_the_ones_hydra_cannot_replace_and_read_no_files():
    """segvoc registers four OmegaConf resolvers, none of which touches the file system while a config is composed
    (0.4's ``config_subdir`` looked for a run's ``.hydra/`` then: segvoc now writes ``.hydra/`` itself)."""
    import os

    from omegaconf import OmegaConf

    import segvoc.config as config

    ours = {name for name in ("repo_root", "run_dir", "run_id", "optuna_study", "config_subdir")
            if OmegaConf.has_resolver(name)}
    assert ours == {"repo_root", "run_dir", "run_id", "optuna_study"}

    from unittest import mock

    touched = []

    def no_files(*args, **kwargs):
        touched.append(args)
        raise OSError("no file system while composing")

    cfg = {"a": "${repo_root:}", "b": "${run_dir:auto,/x/new}", "c": "${run_dir:/x/old,/x/new}",
           "d": "${run_id:}", "e": "${optuna_study:s,['loss=ce'],{}}"}
    OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)  # imports done once, before the file system goes
    with contextlib.ExitStack() as stack:
        for name in ("stat", "lstat", "listdir", "scandir", "open"):
            stack.enter_context(mock.patch.object(os, name, no_files))
        stack.enter_context(mock.patch("builtins.open", no_files))
        resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    assert not touched, touched
    assert resolved["a"] == str(config.REPO_ROOT) and resolved["b"] == "/x/new" and resolved["c"] == "/x/old"
    assert resolved["e"].startswith("s-")


def test_a_key_the_trainer_or_datamodule_does_not_take_is_one_line(smoke_cfg, capsys):
    """The datamodule and the trainer are built by ``instantiate`` from their groups; a key their class does not
    take is one line naming it (not Hydra's multi-line instantiation traceback), before training."""
    from segvoc.app import run_app
    from segvoc.train import train

    for typed, line in (("+trainer.max_epoch=3", "trainer.max_epoch: pytorch_lightning.Trainer takes no such "
                                                  "argument"),
                        ("+data.batchsize=3", "data.batchsize: segvoc.data.datamodule.SegmentationDataModule takes "
                                              "no such argument")):
        with pytest.raises(SystemExit) as exc:
            run_app(train, smoke_cfg(typed))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and err == [f"error: {line}; remove it or check its spelling"], err


def _code_lines(path: Path) -> int:
    """Lines holding code: no blank, comment or docstring lines (how the lean-core issue measures)."""
    import io
    import tokenize

    src = path.read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                docs.update(range(first.lineno, first.end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    return len({line for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type not in skip
                for line in range(tok.start[0], tok.end[0] + 1) if line not in docs})


def test_entry_points_and_the_task_stay_within_their_code_line_limits():
    """Lean core: train.py <= 70 code lines, evaluate/predict/export <= 50 each, the task <= 150."""
    assert _code_lines(Path(__file__)) > 0
    limits = {"segvoc/train.py": 70, "segvoc/evaluate.py": 50, "segvoc/predict.py": 50, "segvoc/export.py": 50,
              "segvoc/engine/task.py": 150}
    measured = {name: _code_lines(REPO_ROOT / name) for name in limits}
    assert all(10 < measured[name] <= limit for name, limit in limits.items()), measured
