"""End-to-end: every report preset composes and runs a smoke fit + test; sweeps; the run output contract."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet34

from segvoc.config import CONF_DIR, REPO_ROOT
from segvoc.train import train

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("[45]*.yaml"))
KEYS = {"loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou", "epoch"}


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    """A ResNet34 state dict written here, standing in for the ImageNet file (no network)."""
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.manual_seed(0)
    torch.save(resnet34().state_dict(), path)
    return path


def test_all_six_report_presets_exist():
    assert PRESETS == ["4a_baseline", "4b_improved", "4c_weighted", "5a_dilated", "5b_transfer", "5c_unet"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke_fit_and_test(preset, smoke_cfg, resnet_weights, tmp_path):
    extra = [f"model.weights={resnet_weights}"] if preset == "5b_transfer" else []
    cfg = smoke_cfg(f"experiment={preset}", "trainer.max_epochs=1", "data.subset=4", *extra)
    assert cfg.name == preset
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("val", "test"):
        assert set(on_disk[split]) == KEYS
        assert len(on_disk[split]["per_class_iou"]) == 21
        assert 0.0 <= on_disk[split]["pixel_acc"] <= 1.0
        assert on_disk[split]["miou"] == pytest.approx(metrics[split]["miou"])
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "splits" / "test.txt").is_file()
    assert_tensorboard_contents(tmp_path / "tb")


def assert_tensorboard_contents(tb: Path) -> None:
    """Scalars, the prediction grid, the confusion figure and an HPARAMS entry with the final result."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images, hparams = set(), set(), False
    for f in tb.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
        with contextlib.suppress(KeyError):  # files without an hparams session
            hparams |= "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert {"train/loss_step", "val/loss", "val/miou", "val/pixel_acc", "val/mean_class_acc", "hp/test_miou"} <= scalars
    assert any(t.startswith("val_iou/") for t in scalars) and any(t.startswith("lr-") for t in scalars)
    assert {"val/predictions", "val/confusion_matrix"} <= images
    assert hparams


def test_seeded_runs_are_reproducible(smoke_cfg, tmp_path):
    a = train(smoke_cfg("paths.output_dir=" + str(tmp_path / "a"), "trainer.max_epochs=1"))
    b = train(smoke_cfg("paths.output_dir=" + str(tmp_path / "b"), "trainer.max_epochs=1"))
    assert a == b


def test_weighted_loss_uses_cached_inverse_frequency_weights(smoke_cfg, tmp_path):
    from segvoc.data.datamodule import build_datamodule
    from segvoc.train import class_weights_for

    cfg = smoke_cfg("loss=weighted_ce", "loss.background_scale=80")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    w = class_weights_for(cfg, dm)
    assert len(w) == 21 and w[0] > 0 and sum(x > 0 for x in w) >= 2
    assert list((tmp_path / "outputs" / "cache").glob("class_counts_*.json"))
    w1 = class_weights_for(smoke_cfg("loss=weighted_ce"), dm)
    assert w[0] == pytest.approx(80 * w1[0]) and w[1:] == pytest.approx(w1[1:])


def _cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_multirun_sweep_over_losses(tmp_path, synthetic_root):
    out = tmp_path / "outputs"
    r = _cli("segvoc.train", "-m", "loss=ce,weighted_ce", "data=synthetic", "data.synthetic=null",
             f"data.root={synthetic_root}", "debug=smoke", "trainer.max_epochs=1", "data.subset=4",
             "trainer.enable_progress_bar=false", f"paths.output_root={out}", cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in (out / "multirun").glob("*/*/*") if p.is_dir())
    assert len(runs) == 2, runs
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["test"]["miou"] >= 0
        assert (run / ".hydra" / "config.yaml").is_file()
    losses = sorted(json.loads((run / "metrics.json").read_text())["val"]["loss"] for run in runs)
    assert losses[0] != losses[1]


def test_missing_data_is_one_line_and_nonzero(tmp_path):
    r = _cli("segvoc.train", f"data.root={tmp_path}/nope", f"paths.output_root={tmp_path}/o", cwd=REPO_ROOT)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err[-1].startswith("error: VOC 2012 not found at") and "Traceback" not in r.stderr


@pytest.mark.parametrize("preset", ["ref_fcn_resnet50", "ref_deeplabv3_resnet50"])
def test_reference_presets_train_with_aux_loss(preset, smoke_cfg, tmp_path):
    cfg = smoke_cfg(f"experiment={preset}", "model.weights=none", "trainer.max_epochs=1", "data.subset=2",
                    "data.batch_size=2", "scheduler.scheduler.total_iters=null")
    assert cfg.scheduler.name == "poly" and cfg.model.aux_loss
    metrics = train(cfg)
    assert 0 <= metrics["test"]["miou"] <= 1


def test_aux_output_adds_weighted_aux_loss():
    from segvoc.losses import CrossEntropy

    ce = CrossEntropy(3, aux_weight=0.5)
    target = torch.tensor([[[0, 1], [2, 255]]])
    out, aux = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    assert torch.allclose(ce({"out": out, "aux": aux}, target), ce(out, target) + 0.5 * ce(aux, target))
