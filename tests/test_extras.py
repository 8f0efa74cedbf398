"""Core segvoc without its extras (pyproject.toml's optional dependencies, ``segvoc.extras``): an import hook makes
every package that only the extras pull fail to import, as in an install without them; train, evaluate and predict
still work, and each command that needs an extra fails in one line naming it. Also: pyproject.toml, constraints.txt
and ``segvoc.extras.EXTRAS`` agree."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from segvoc.config import REPO_ROOT
from segvoc.errors import MissingExtraError
from segvoc.extras import EXTRAS, check_command_line, exit_if_missing, require

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = PROJECT["optional-dependencies"]
INTEGRATIONS = sorted(set(OPTIONAL) - {"all", "test", "docs"})


def _requirements(extras: list[str]) -> list[Requirement]:
    """segvoc's requirements with ``extras`` (``segvoc[...]`` self-references expanded)."""
    out, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in OPTIONAL[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == "segvoc":
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def _closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` pull, by canonical name (markers evaluated here, with each
    requirement's extras)."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, tuple[str, ...]]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in done:
            continue
        done.add(key)
        dist = found.setdefault(key[0], metadata.distribution(req.name))
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return found


def _blocked_modules() -> list[str]:
    """The top-level modules that only the extras' packages provide (their dependencies included), and the modules
    of ``EXTRAS`` (``hydra_plugins.hydra_submitit_launcher`` shares its namespace with segvoc's sweeper)."""
    core = set(_closure(_requirements([])))
    only_extras = set(_closure(_requirements(["all"]))) - core
    blocked = {module for module, dists in metadata.packages_distributions().items()
               if module != "hydra_plugins" and {canonicalize_name(d) for d in dists} <= only_extras}
    return sorted(blocked | {m for modules in EXTRAS.values() for m in modules})


def test_pyproject_extras_and_segvoc_extras_agree():
    """Each integration extra of pyproject.toml is one of ``EXTRAS`` and the other way round, ``all`` is every one
    of them, each of an extra's modules comes from a package that extra pulls, and the core pulls none of them."""
    assert sorted(EXTRAS) == INTEGRATIONS
    assert {e for r in OPTIONAL["all"] for e in Requirement(r).extras} == set(EXTRAS)
    providers = metadata.packages_distributions()
    core = set(_closure(_requirements([])))
    for extra, modules in EXTRAS.items():
        pulled = set(_closure(_requirements([extra]))) - core
        for module in modules:
            top = module.split(".")[0]
            dists = {canonicalize_name(d) for d in providers.get(top, [])}
            assert dists & pulled, f"{extra}: {module} comes from {dists or 'nothing installed'}, not from the extra"


def test_constraints_pin_every_package_the_install_pulls_within_the_stated_ranges():
    """constraints.txt pins each package of ``pip install -e '.[all,test]'`` (as installed here), and each pin is
    inside pyproject.toml's range for it, core, extras and docs: ``make install`` resolves to exactly those."""
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    missing = sorted(set(_closure(_requirements(["all", "test"]))) - set(pins))
    assert not missing, f"constraints.txt lacks {missing}"
    for req in _requirements(["all", "test", "docs"]):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req}"


def test_require_names_the_extra_and_the_pip_command(monkeypatch):
    assert require("sweep", "hparams_search=optuna").__name__ == "optuna"
    monkeypatch.setitem(EXTRAS, "sweep", ("optuna", "segvoc_no_such_module"))
    with pytest.raises(MissingExtraError) as err:
        require("sweep", "hparams_search=optuna")
    assert str(err.value) == "hparams_search=optuna needs the sweep extra: pip install 'segvoc[sweep]'"


def test_command_line_choices_that_need_an_extra(monkeypatch, capsys):
    """The Hydra choices resolved before segvoc's code runs, each option of a sweep over them; others pass."""
    for extra in ("slurm", "sweep"):
        monkeypatch.setitem(EXTRAS, extra, ("segvoc_no_such_module",))
    check_command_line(["-m", "hydra/launcher=basic", "loss=ce,focal", "model.hparams_search=optuna"])
    cases = {"hydra/launcher=slurm": "slurm", "hydra/launcher=basic,local": "slurm",
             "hydra/launcher=submitit_slurm": "slurm", "+hparams_search=optuna": "sweep",
             "hydra/sweeper=segvoc_optuna": "sweep"}
    for arg, extra in cases.items():
        with pytest.raises(SystemExit) as stop:
            exit_if_missing(["-m", "seed=1,2", arg])
        assert stop.value.code == 2
        option = arg.lstrip("+").split(",")[-1].split("=")[-1]
        key = arg.lstrip("+").split("=")[0]
        assert capsys.readouterr().err == (f"error: {key}={option} needs the {extra} extra: "
                                           f"pip install 'segvoc[{extra}]'\n")


def test_the_sweeper_and_the_study_callback_name_the_sweep_extra(monkeypatch, capsys):
    """A search chosen in a config file (no command-line choice to check) still ends with the extra's name: one
    line and exit code 2 from the sweeper."""
    from omegaconf import OmegaConf

    from hydra_plugins.segvoc_optuna.segvoc_optuna_sweeper import SegvocOptunaSweeper
    from segvoc.runs.optuna_study import OptunaStudy

    monkeypatch.setitem(EXTRAS, "sweep", ("segvoc_no_such_module",))
    sweeper = SegvocOptunaSweeper(None, None, "maximize", None, "s", 1, 1)
    with pytest.raises(SystemExit) as exc:
        sweeper.sweep([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: hydra/sweeper=segvoc_optuna needs the sweep extra: pip install "
                                       "'segvoc[sweep]'\n")
    config = OmegaConf.create({"hydra": {"sweeper": {"storage": None}}})
    with pytest.raises(SystemExit) as exc:
        OptunaStudy().on_multirun_start(config)
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: hparams_search=optuna needs the sweep extra: pip install "
                                       "'segvoc[sweep]'\n")


# Runs in a fresh interpreter: the hook first, then every command through its ``python -m`` entry (runpy), so the
# imports, Hydra's composition and the one-line errors are those of the real commands.
_WITHOUT_EXTRAS = textwrap.dedent('''
    import contextlib, io, json, runpy, sys, warnings
    from pathlib import Path

    # runpy runs the entry modules again as __main__ after the import check below imported them: expected here
    warnings.filterwarnings("ignore", message=r"'segvoc\\.\\w+' found in sys.modules after import of package",
                            category=RuntimeWarning)

    blocked, extras, tmp = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
    ours = (str(Path.cwd() / "segvoc"), str(Path.cwd() / "hydra_plugins"))
    tried = []  # (module, the file whose code asked for it)

    def under(name, roots):
        return any(name == r or name.startswith(r + ".") for r in roots)

    class Absent:
        """Every other finder, except that a blocked module is not found: ``import`` raises ModuleNotFoundError and
        ``importlib.util.find_spec`` returns None, as when the package is not installed."""

        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if under(name, blocked):
                frame = sys._getframe(1)
                while frame and (frame.f_code.co_filename.startswith("<frozen")
                                 or "/importlib/" in frame.f_code.co_filename):
                    frame = frame.f_back
                tried.append((name, frame.f_code.co_filename if frame else "?"))
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    return spec
            return None

        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Absent(list(sys.meta_path))]

    def by_segvoc():
        return sorted({name for name, file in tried if file.startswith(ours) and under(name, extras)})

    out = {}
    # the entry points, and the sweeper Hydra imports at every start
    import hydra_plugins.segvoc_optuna.segvoc_optuna_sweeper, segvoc.evaluate, segvoc.export, segvoc.predict  # noqa
    import segvoc.report, segvoc.train  # noqa: E401
    out["loaded"] = sorted(m for m in sys.modules if under(m, extras + ["segvoc.bench"]))
    out["tried"] = by_segvoc()

    def command(module, *args):
        sys.argv = [module, *args]
        err, code = io.StringIO(), 0
        with contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code
        return {"code": code, "stderr": err.getvalue()}

    data = ["data=synthetic", "debug=smoke", "trainer.max_epochs=1", "data.synthetic.num_train=8",
            "data.synthetic.num_val=8", "data.synthetic.height=48", "data.synthetic.width=64",
            f"paths.output_root={tmp}", "trainer.enable_progress_bar=false"]
    out["train"] = command("segvoc.train", *data, f"hydra.run.dir={tmp}/run")
    ckpt = tmp / "run" / "checkpoints" / "best.ckpt"
    out["evaluate"] = command("segvoc.evaluate", f"ckpt={ckpt}", f"paths.output_root={tmp}",
                              f"hydra.run.dir={tmp}/evaluate", "trainer.enable_progress_bar=false")
    out["tried_by_core_runs"] = sorted(set(by_segvoc()) - set(out["tried"]))
    fake = tmp / "model.onnx"
    fake.write_bytes(b"not read: the extra is checked first")
    image = next((tmp / "data" / "synthetic").rglob("*.jpg"))
    refusals = {f"train {choice}": ("segvoc.train", *data, choice, f"hydra.run.dir={tmp}/{i}")
                for i, choice in enumerate(["logger=mlflow", "logger=wandb", "model=smp", "loss=lovasz",
                                            "hparams_search=optuna", "hydra/launcher=slurm", "hydra/launcher=local"])}
    refusals["export format=onnx"] = ("segvoc.export", f"ckpt={ckpt}", "format=onnx", f"output={tmp}/m.onnx")
    refusals["evaluate .onnx"] = ("segvoc.evaluate", f"ckpt={fake}", f"paths.output_root={tmp}",
                                  f"hydra.run.dir={tmp}/ev_onnx")
    refusals["predict .onnx"] = ("segvoc.predict", f"ckpt={fake}", f"input={image}", f"output={tmp}/masks",
                                 f"hydra.run.dir={tmp}/pr_onnx")
    out["refusals"] = {name: command(*args) for name, args in refusals.items()}
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One interpreter without the extras: imports, a smoke run and its evaluation, then each refusal."""
    tmp = tmp_path_factory.mktemp("no-extras")
    extras = sorted({m for modules in EXTRAS.values() for m in modules})
    r = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, json.dumps(_blocked_modules()), json.dumps(extras),
                        str(tmp)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return {"tmp": tmp, **json.loads(lines[-1][len("RESULT "):])}


@pytest.mark.slow
def test_train_evaluate_predict_export_report_and_the_sweeper_import_no_extra(without_extras):
    assert not without_extras["loaded"], without_extras["loaded"]
    assert not without_extras["tried"], without_extras["tried"]


@pytest.mark.slow
def test_a_smoke_run_trains_and_evaluates_without_the_extras(without_extras):
    train, evaluate = without_extras["train"], without_extras["evaluate"]
    assert train["code"] in (0, None), train["stderr"][-3000:]
    assert evaluate["code"] in (0, None), evaluate["stderr"][-3000:]
    tmp = without_extras["tmp"]
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    assert json.loads((tmp / "evaluate" / "metrics.json").read_text())["test"]["miou"] == metrics["test"]["miou"]
    assert not without_extras["tried_by_core_runs"], without_extras["tried_by_core_runs"]


REFUSALS = {
    "train logger=mlflow": ("logger=mlflow", "mlflow"),
    "train logger=wandb": ("logger=wandb", "wandb"),
    "train model=smp": ("model=smp", "smp"),
    "train loss=lovasz": ("loss=lovasz", "smp"),
    "train hparams_search=optuna": ("hparams_search=optuna", "sweep"),
    "train hydra/launcher=slurm": ("hydra/launcher=slurm", "slurm"),
    "train hydra/launcher=local": ("hydra/launcher=local", "slurm"),
    "export format=onnx": ("format=onnx", "export"),
    "evaluate .onnx": ("ckpt={tmp}/model.onnx", "export"),
    "predict .onnx": ("ckpt={tmp}/model.onnx", "export"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_command_that_needs_an_extra_says_which_in_one_line(without_extras, name):
    what, extra = REFUSALS[name]
    result = without_extras["refusals"][name]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    expected = f"error: {what.format(tmp=without_extras['tmp'])} needs the {extra} extra: pip install 'segvoc[{extra}]'"
    assert result["code"] == 2 and errors == [expected], result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
