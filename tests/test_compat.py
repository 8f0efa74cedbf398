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
