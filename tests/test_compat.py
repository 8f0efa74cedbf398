"""Runs written by segvoc 0.3 (before the 0.4 layout moved its modules) still load, evaluate and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from segvoc.config import compose
from segvoc.engine.builders import load_task
from segvoc.engine.checkpoint import MOVED_MODULES, read_checkpoint, upgrade_targets
from tests.helpers import pin_unbeatable_best

FIXTURE = Path(__file__).parent / "fixtures" / "run_0_3"  # loss=focal, fcn_baseline with 2-channel layers


@pytest.fixture(scope="module")
def data_0_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tree the fixture was trained on (regenerated: same sizes and seed)."""
    from segvoc.data.synthetic import generate

    root = tmp_path_factory.mktemp("data03") / "synthetic"
    generate(root, num_train=8, num_val=8, height=40, width=48, seed=0)
    return root


def test_the_fixture_stores_old_module_paths():
    stored = read_checkpoint(FIXTURE / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]
    assert stored["loss"]["_target_"] == "segvoc.losses.Focal"  # 0.3's path: the module is a package now
    assert upgrade_targets(stored)["loss"]["_target_"] == "segvoc.losses.segmentation.Focal"
    assert set(MOVED_MODULES) >= {"segvoc.losses", "segvoc.task", "segvoc.runs"}


def test_a_0_3_checkpoint_loads_and_evaluates_to_its_own_scores(data_0_3, tmp_path):
    from segvoc.evaluate import evaluate

    task, cfg = load_task(FIXTURE / "checkpoints" / "last.ckpt")
    assert type(task.criterion).__name__ == "Focal"
    got = evaluate(compose([f"ckpt={FIXTURE / 'checkpoints' / 'last.ckpt'}", f"paths.output_dir={tmp_path}",
                            f"data.root={data_0_3}", "trainer.enable_progress_bar=false"],
                           config_name="evaluate"))["test"]
    expected = json.loads((FIXTURE / "metrics.json").read_text())["test"]
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_a_0_3_run_resumes(data_0_3, tmp_path):
    from segvoc.train import train

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    before = read_checkpoint(run / "checkpoints" / "last.ckpt")
    (run / "metrics.json").unlink()
    metrics = train(compose([f"resume={run}", f"paths.output_dir={run}", f"data.root={data_0_3}",
                             "trainer.max_epochs=3", "trainer.enable_progress_bar=false"]))
    after = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert before["epoch"] == 1 and after["epoch"] == 2
    assert after["global_step"] > before["global_step"]
    assert metrics["test"]["epoch"] is not None
    changed = [k for k, v in after["state_dict"].items() if not torch.equal(v, before["state_dict"][k])]
    assert changed, "the resumed epoch trained nothing"


FIXTURE_0_4 = Path(__file__).parent / "fixtures" / "run_0_4"  # made by segvoc 0.4 (4a55eba): weighted_ce, 2 epochs


@pytest.fixture(scope="module")
def run_0_4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the 0.4 run (its checkpoints store paths of the machine that made it) and its data, regenerated."""
    from segvoc.data.synthetic import generate

    base = tmp_path_factory.mktemp("run04")
    generate(base / "data", num_train=8, num_val=8, height=40, width=48, seed=0)
    shutil.copytree(FIXTURE_0_4, base / "run")
    return base / "run", base / "data"


def test_a_0_4_run_evaluates_to_its_own_scores(run_0_4, tmp_path):
    from segvoc.evaluate import evaluate

    run, data = run_0_4
    got = evaluate(compose([f"ckpt={run}", f"paths.output_dir={tmp_path}", f"data.root={data}",
                            "trainer.enable_progress_bar=false"], config_name="evaluate"))["test"]
    expected = json.loads((FIXTURE_0_4 / "metrics.json").read_text())["test"]
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert got["per_class_iou"] == pytest.approx(expected["per_class_iou"], abs=1e-9)


def test_a_0_4_run_counts_as_finished_and_as_segvoc_s_own(run_0_4, tmp_path, monkeypatch):
    """resume=auto skips it as finished (0.4 wrote metrics.json and MODEL_CARD.md last); without them it resumes;
    overwrite=true may clear it (its .hydra/ and checkpoints prove segvoc made it) and keeps a user's file."""
    from segvoc.config import stored_overrides
    from segvoc.runs.lifecycle import LAUNCH_ENV, decide, finished, legacy_run, open_run
    from segvoc.safety.ownership import owned, read_marker

    run, data = run_0_4
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert legacy_run(copy) and owned(copy, "run", legacy_run) and finished(copy)
    common = [f"paths.output_dir={copy}", f"data.root={data}"]
    typed = stored_overrides(copy)  # the same launch again
    assert decide(compose([*common, "resume=auto"]), typed).action == "finished"
    (copy / "MODEL_CARD.md").unlink()  # died before its last file: resumed and re-scored, not skipped
    assert decide(compose([*common, "resume=auto"]), typed).action == "resume"
    assert decide(compose([*common, "overwrite=true"]), typed).clear
    (copy / "notes.txt").write_text("mine")
    monkeypatch.delenv(LAUNCH_ENV, raising=False)  # open_run publishes its decision there (for DDP ranks)
    with open_run(compose([*common, "overwrite=true"])) as run:  # decided, locked, cleared and claimed
        assert run.clear
    assert (copy / "notes.txt").read_text() == "mine"
    assert not list((copy / "checkpoints").glob("*.ckpt")) and not (copy / "metrics.json").exists()
    assert read_marker(copy)["kind"] == "run"


def test_0_4_checkpoint_callback_states_load_into_today_s_callbacks():
    """Lightning keys callback states by class name: today's subclasses keep 0.4's keys, so a resumed 0.4 run keeps
    its best score and early-stopping counters."""
    from segvoc.engine.callbacks import ResumableEarlyStopping, RunCheckpoint

    stored = read_checkpoint(FIXTURE_0_4 / "checkpoints" / "last.ckpt")["callbacks"]
    best = RunCheckpoint(dirpath="x", filename="best", monitor="val/miou", mode="max")
    last = RunCheckpoint(dirpath="x", filename="last", monitor=None, every_n_epochs=1)
    stop = ResumableEarlyStopping(monitor="val/miou", mode="max", patience=5)
    assert {best.state_key, last.state_key, stop.state_key} == set(stored)


def test_a_0_4_run_resumes(run_0_4, tmp_path):
    from segvoc.train import train

    run, data = run_0_4
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.json").unlink()
    (copy / "MODEL_CARD.md").unlink()  # both written again by the resumed run (0.4 added RunArtifacts in code)
    last = copy / "checkpoints" / "last.ckpt"
    pin_unbeatable_best(last)  # a best the resumed epoch cannot beat
    best = (copy / "checkpoints" / "best.ckpt").read_bytes()
    before = read_checkpoint(last)
    metrics = train(compose([f"resume={copy}", f"paths.output_dir={copy}", f"data.root={data}",
                             "trainer.max_epochs=3", "trainer.enable_progress_bar=false"]))
    after = read_checkpoint(copy / "checkpoints" / "last.ckpt")
    assert (before["epoch"], after["epoch"]) == (1, 2) and after["global_step"] > before["global_step"]
    assert (copy / "MODEL_CARD.md").is_file() and metrics["test"]["epoch"] is not None
    assert json.loads((copy / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # 0.4's stored checkpoint state (dirpath of the machine that made it) keeps its best: best.ckpt not overwritten
    assert (copy / "checkpoints" / "best.ckpt").read_bytes() == best
    assert json.loads((copy / "class_weights.json").read_text()) == json.loads(
        (FIXTURE_0_4 / "class_weights.json").read_text())
