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
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from torchvision.models import resnet34

from segvoc.config import CONF_DIR, REPO_ROOT
from segvoc.train import train

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("[45]*.yaml"))
KEYS = {"loss", "miou", "pixel_acc", "mean_class_acc", "per_class_iou", "boundary_miou", "per_class_boundary_iou",
        "ece", "calibration", "ci", "ci_method", "ci_na", "epoch", "classes"}


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    """A ResNet34 state dict written here, standing in for the ImageNet file (no network)."""
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.manual_seed(0)
    torch.save(resnet34().state_dict(), path)
    return path


# report section -> (model, loss and its class weights, scheduler, augmentation, optimizer and lr): sections 3.1-3.3
REPORT_RECIPES = {
    "4a_baseline": ("FCNBaseline", "CrossEntropy", "none", None, "none", "Adam", 1e-3),
    "4b_improved": ("FCNBaseline", "CrossEntropy", "none", "CosineAnnealingLR", "report", "Adam", 1e-3),
    "4c_weighted": ("FCNBaseline", "CrossEntropy", "inverse_frequency", "CosineAnnealingLR", "report", "Adam", 1e-3),
    "5a_dilated": ("FCNDilated", "CrossEntropy", "none", "CosineAnnealingLR", "report", "Adam", 1e-3),
    "5b_transfer": ("ResNet34Transfer", "CrossEntropy", "none", "CosineAnnealingLR", "report", "Adam", 1e-3),
    "5c_unet": ("UNet", "CrossEntropy", "none", "CosineAnnealingLR", "report", "Adam", 1e-3),
}


@pytest.mark.parametrize("preset", sorted(REPORT_RECIPES))
def test_each_report_preset_composes_the_report_s_recipe(preset, tmp_path):
    """The six presets are the report's sections: model, loss and weighting, cosine annealing (T_max = epochs,
    eta_min 1e-6), augmentation, Adam 1e-3, 30 epochs with early stopping (patience 5), one command each."""
    from segvoc.config import compose

    assert sorted(REPORT_RECIPES) == PRESETS
    cfg = compose([f"experiment={preset}", f"paths.output_dir={tmp_path}"])
    model, loss, weights, scheduler, augment, optimizer, lr = REPORT_RECIPES[preset]
    assert cfg.name == preset
    assert cfg.model._target_.endswith(f".{model}") and cfg.loss._target_.endswith(f".{loss}")
    assert cfg.loss.class_weights == weights and cfg.loss.background_scale == 1.0
    assert (cfg.scheduler.scheduler or {}).get("_target_", "").endswith(scheduler or "") and bool(
        cfg.scheduler.scheduler) == (scheduler is not None)
    if scheduler:
        assert cfg.scheduler.scheduler.T_max == cfg.trainer.max_epochs == 30 and cfg.scheduler.scheduler.eta_min == 1e-6
    assert cfg.choices.augment == augment
    assert cfg.optimizer._target_.endswith(optimizer) and cfg.optimizer.lr == lr
    assert cfg.callbacks.early_stopping.patience == 5 and cfg.callbacks.early_stopping.monitor == "val/miou"


# the heavier presets (dilated FCN, ResNet34, U-Net) are end-to-end runs of make test only; 4a-4c stay in test-fast
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p.startswith("5") else p
                                    for p in PRESETS])
def test_preset_smoke_fit_and_test(preset, smoke_cfg, resnet_weights, tmp_path):
    extra = [f"model.weights={resnet_weights}"] if preset == "5b_transfer" else []
    cfg = smoke_cfg(f"experiment={preset}", "trainer.max_epochs=1", "data.subset=4", *extra)
    assert cfg.name == preset
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("val", "test"):
        assert set(on_disk[split]) == KEYS
        assert len(on_disk[split]["per_class_iou"]) == len(on_disk[split]["classes"]) == 21
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


@pytest.mark.slow
def test_seeded_runs_are_reproducible(smoke_cfg, tmp_path):
    a = train(smoke_cfg("paths.output_dir=" + str(tmp_path / "a"), "trainer.max_epochs=1"))
    b = train(smoke_cfg("paths.output_dir=" + str(tmp_path / "b"), "trainer.max_epochs=1"))
    assert a == b


def test_weighted_loss_uses_cached_inverse_frequency_weights(smoke_cfg, tmp_path):
    from segvoc.engine.builders import build_datamodule, class_weights_for

    cfg = smoke_cfg("loss=weighted_ce", "loss.background_scale=80")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    w = class_weights_for(cfg, dm).weights
    # the weights by hand: pixels of each class over the training masks (255 ignored), n_total / (k_present * n_c)
    import numpy as np

    counts = np.zeros(21, np.int64)
    for path in dm.datasets["train"].mask_paths():
        counts += np.bincount(np.asarray(Image.open(path)).reshape(-1), minlength=256)[:21]
    present = counts > 0
    assert 2 <= present.sum() < 21  # absent classes get weight 0, so the formula's k is exercised
    by_hand = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    by_hand[0] *= 80
    assert w == pytest.approx(by_hand.tolist(), rel=1e-12)
    caches = list((tmp_path / "outputs" / "cache").glob("class_stats_*.json"))
    assert len(caches) == 1
    w1 = class_weights_for(smoke_cfg("loss=weighted_ce"), dm).weights
    assert w[0] == pytest.approx(80 * w1[0]) and w[1:] == pytest.approx(w1[1:])
    # the cache is read, not recomputed: counts edited in it change the weights
    data = json.loads(caches[0].read_text())
    data["counts"] = [c * (2 if k == 1 else 1) for k, c in enumerate(data["counts"])]
    caches[0].write_text(json.dumps(data))
    w2 = class_weights_for(smoke_cfg("loss=weighted_ce"), dm).weights
    assert w2[1] != pytest.approx(w1[1]) and w2[1] == pytest.approx(by_hand[1] * (counts.sum() + counts[1])
                                                                     / counts.sum() / 2, rel=1e-12)


def _cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_multirun_sweep_over_losses(tmp_path, synthetic_root):
    out = tmp_path / "outputs"
    r = _cli("segvoc.train", "-m", "loss=ce,weighted_ce", "data=synthetic", "data.synthetic=null",
             f"data.root={synthetic_root}", "debug=smoke", "trainer.max_epochs=1", "data.subset=4",
             "trainer.enable_progress_bar=false", f"paths.output_root={out}", cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in (out / "multirun").glob("*/*/*") if p.is_dir())
    # each job's folder names what it trains: its overrides but for where and how it runs (data.root, debug, ...)
    assert [r.name for r in runs] == [f"{k}_fcn_baseline_data.subset-4__loss-{loss}__trainer.max_epochs-1"
                                      for k, loss in enumerate(("ce", "weighted_ce"))], runs
    for run, loss, weights in zip(runs, ("ce", "weighted_ce"), ("none", "inverse_frequency"), strict=True):
        stored = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert stored.loss.class_weights == weights and f"loss={loss}" in OmegaConf.load(
            run / ".hydra" / "overrides.yaml")
        assert (run / "class_weights.json").is_file() == (loss == "weighted_ce")  # the weighting really ran
        assert set(json.loads((run / "metrics.json").read_text())) == {"val", "test"}
    losses = sorted(json.loads((run / "metrics.json").read_text())["val"]["loss"] for run in runs)
    assert losses[0] != losses[1]


@pytest.mark.slow
def test_missing_data_is_one_line_and_nonzero(tmp_path):
    r = _cli("segvoc.train", f"data.root={tmp_path}/nope", f"paths.output_root={tmp_path}/o", cwd=REPO_ROOT)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err[-1].startswith("error: VOC 2012 not found at") and "Traceback" not in r.stderr


@pytest.mark.parametrize("preset", ["ref_fcn_resnet50", "ref_deeplabv3_resnet50"])
def test_reference_presets_train_with_aux_loss(preset, smoke_cfg, tmp_path):
    cfg = smoke_cfg(f"experiment={preset}", "model.weights=none", "trainer.max_epochs=1", "data.subset=2",
                    "data.batch_size=2", "scheduler.scheduler.total_iters=null")
    assert cfg.choices.scheduler == "poly" and cfg.model.aux_loss
    from segvoc.losses.segmentation import CrossEntropy

    aux_terms = []
    forward = CrossEntropy.forward

    def spy(self, output, target):  # record that training sees the aux head's output and weights it
        if isinstance(output, dict):
            aux_terms.append((set(output), self.aux_weight))
        return forward(self, output, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CrossEntropy, "forward", spy)
        metrics = train(cfg)
    assert aux_terms and all(keys == {"out", "aux"} and w == 0.5 for keys, w in aux_terms)
    assert 0 <= metrics["test"]["miou"] <= 1


def test_weighted_loss_is_applied_during_fit(smoke_cfg, monkeypatch):
    """The training steps' cross-entropy really receives the class weights (background x80 included), and the run
    directory records them in class_weights.json."""
    import torch.nn.functional as F

    from segvoc.engine.builders import build_datamodule, class_weights_for

    cfg = smoke_cfg("loss.class_weights=median_frequency", "loss.background_scale=80", "trainer.max_epochs=1")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    record = class_weights_for(cfg, dm)
    expected = torch.tensor(record.weights, dtype=torch.float32)
    seen = []
    cross_entropy = F.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight"))
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    train(cfg)
    assert seen and all(w is not None and torch.equal(w.cpu(), expected) for w in seen)
    saved = json.loads((Path(cfg.paths.output_dir) / "class_weights.json").read_text())
    assert saved == {"scheme": "median_frequency", "weights": record.weights, "counts": record.counts}
    pairs = zip(saved["weights"], saved["counts"], strict=True)
    assert sum(saved["counts"]) > 0 and all(w == 0 for w, n in pairs if n == 0)


def test_ckpt_path_starts_a_new_run_from_a_checkpoint(smoke_cfg, tmp_path):
    """``ckpt_path=<file>`` continues training from that state in a new run directory."""
    first = tmp_path / "first"
    train(smoke_cfg(f"paths.output_dir={first}", "trainer.max_epochs=1"))
    ckpt = first / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    metrics = train(smoke_cfg(f"paths.output_dir={second}", f"ckpt_path={ckpt}", "trainer.max_epochs=2"))
    after = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    before = torch.load(ckpt, weights_only=True)
    assert after["epoch"] == 1 and after["global_step"] == 2 * before["global_step"]  # one more epoch, not two
    assert (second / "metrics.json").is_file() and 0 <= metrics["test"]["miou"] <= 1
    assert torch.load(ckpt, weights_only=True)["global_step"] == before["global_step"]  # the source is untouched


def test_train_aug_split_reads_segmentation_class_aug(tmp_path, synthetic_root):
    """``data.train_split=train_aug`` trains on ``train_aug.txt`` with masks from ``SegmentationClassAug``."""
    import shutil

    from segvoc.engine.builders import build_datamodule
    from tests.conftest import make_cfg

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    aug_ids = (sets / "train.txt").read_text().split()[:6]
    (sets / "train_aug.txt").write_text("\n".join(aug_ids) + "\n")
    (voc / "SegmentationClassAug").mkdir()
    for i in aug_ids:  # a different mask than SegmentationClass: all background, so the source is visible
        mask = Image.open(voc / "SegmentationClass" / f"{i}.png")
        blank = Image.new("P", mask.size, 0)
        blank.putpalette(mask.getpalette())
        blank.save(voc / "SegmentationClassAug" / f"{i}.png")
    cfg = make_cfg(tmp_path / "run", "data=synthetic", "debug=smoke", "data.synthetic=null",
                   "data.train_split=train_aug", "data.subset=null", "trainer.max_epochs=1",
                   "loss.class_weights=inverse_frequency", data_root=root)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert dm.splits["train"] == aug_ids
    masks = [dm.datasets["train"][k]["mask"] for k in range(len(aug_ids))]
    assert all(set(m.unique().tolist()) <= {0, 255} for m in masks)
    train(cfg)
    run = tmp_path / "run"
    assert (run / "splits" / "train.txt").read_text().split() == aug_ids  # the run trained on train_aug's ids
    counts = json.loads((run / "class_weights.json").read_text())["counts"]
    assert counts[0] > 0 and not any(counts[1:])  # and counted its training pixels in SegmentationClassAug


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO_ROOT / "conf" / group).glob("*.yaml"))


CPU_TRAINERS = ["cpu", "default"]  # gpu, ddp need CUDA; ddp_cpu runs in test_scale (processes)
GROUP_CHOICES = [(g, c) for g in ("model", "optimizer", "scheduler", "loss", "augment", "logger", "callbacks",
                                  "infer", "perf", "debug") for c in _choices(g)]
GROUP_CHOICES += [("trainer", c) for c in CPU_TRAINERS] + [("data", "voc_mini"), ("data", "synthetic")]


@pytest.mark.slow
@pytest.mark.parametrize(("group", "choice"), GROUP_CHOICES, ids=[f"{g}={c}" for g, c in GROUP_CHOICES])
def test_every_documented_choice_runs(group, choice, tmp_path, synthetic_root, voc_mini):
    """Each choice of each config group composes with the others (debug=smoke, the defaults) and runs a tiny
    fit + test on the CPU."""
    from tests.conftest import make_cfg

    overrides = {"data": "synthetic", "debug": "smoke", group: choice}
    root = voc_mini if overrides["data"] == "voc_mini" else synthetic_root
    args = [f"{g}={c}" for g, c in overrides.items()]
    args += ["data.synthetic=null"] if overrides["data"] == "synthetic" else []
    args += ["trainer.max_epochs=1", "data.subset=2", "data.batch_size=2", "data.image_size=64",
             "data.num_workers=0", "trainer.accelerator=cpu"]
    cfg = make_cfg(tmp_path, *args, data_root=root)
    for key in ("weights", "encoder_weights"):  # no ImageNet download here
        if key in cfg.model:
            cfg.model[key] = "none"
    assert HydraConfig.get().runtime.choices[group] == choice  # the choice is what composed and runs
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    _check_scores_against_the_masks(cfg, out, metrics)


def _check_scores_against_the_masks(cfg, out: Path, metrics: dict) -> None:
    """Each split's confusion matrix counts every labelled pixel of its masks once, and the scores follow from it
    (pixel accuracy = trace / total, mIoU over classes with a non-empty union)."""
    import numpy as np

    from segvoc.engine.builders import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup("fit")
    dm.setup("test")
    confusion = json.loads((out / "confusion.json").read_text())
    for split in ("val", "test"):
        cm = np.array(confusion[split], dtype=np.int64)
        labelled = sum(int((np.asarray(Image.open(p)) != 255).sum()) for p in dm.datasets[split].mask_paths())
        assert cm.sum() == labelled > 0, split
        scores = metrics[split]
        assert np.isfinite(scores["loss"])
        assert scores["pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-9)
        inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
        assert scores["miou"] == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])), abs=1e-9)


@pytest.mark.slow
def test_overfitted_real_images_score_at_evaluation_what_they_scored_in_training(voc_mini, tmp_path):
    """augment=none trains at the native scale evaluation uses. Two real VOC images, overfitted, are then scored
    at full resolution (val and test both hold one of them): with training images shrunk to data.image_size
    (before), pixel accuracy was 0.84 / 0.96 here; at the same scale it is the training fit, above 0.97."""
    import shutil

    from tests.conftest import make_cfg

    shutil.copytree(voc_mini, tmp_path / "VOC2012")
    sets = tmp_path / "VOC2012" / "ImageSets" / "Segmentation"
    (sets / "val.txt").write_text((sets / "train.txt").read_text())  # score the training images themselves
    cfg = make_cfg(tmp_path / "run", "experiment=4a_baseline", "debug=overfit", "data.image_size=160",
                   "trainer.max_epochs=60", "+trainer.check_val_every_n_epoch=60", "logger=none",
                   data_root=tmp_path / "VOC2012")
    metrics = train(cfg)
    assert metrics["val"]["pixel_acc"] > 0.97 and metrics["test"]["pixel_acc"] > 0.97, metrics


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "gpu_exact", "ddp", "ddp_cpu", "default"])
@pytest.mark.parametrize("experiment", ["4a_baseline", "5b_transfer", "ref_deeplabv3_resnet50"])
def test_debug_smoke_composes_with_every_trainer_and_experiment(trainer, experiment, tmp_path):
    from segvoc.config import compose

    cfg = compose([f"paths.output_dir={tmp_path}", f"trainer={trainer}", f"experiment={experiment}", "debug=smoke"])
    assert (cfg.data.subset, cfg.data.image_size, cfg.trainer.max_epochs) == (8, 64, 2)
    plain = compose([f"paths.output_dir={tmp_path}", f"trainer={trainer}", f"experiment={experiment}"])
    assert cfg.trainer.accelerator == plain.trainer.accelerator and cfg.trainer.get("strategy") == \
        plain.trainer.get("strategy") and cfg.choices.model == plain.choices.model


def test_gpu_exact_trainer_turns_on_deterministic_algorithms(tmp_path, monkeypatch):
    """trainer=gpu_exact: trainer=gpu (bf16) plus deterministic algorithms, cuDNN autotuning off and cuBLAS's fixed
    workspace, all set when the Trainer is built (checked here with accelerator=cpu: no GPU on this machine)."""
    from omegaconf import open_dict

    from segvoc.config import compose
    from segvoc.engine.builders import build_trainer

    cfg = compose([f"paths.output_dir={tmp_path}", "trainer=gpu_exact", "logger=none"])
    gpu = compose([f"paths.output_dir={tmp_path}", "trainer=gpu"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == (gpu.trainer.accelerator, gpu.trainer.precision)
    assert cfg.trainer.deterministic is True and cfg.trainer.benchmark is False
    assert gpu.trainer.deterministic is False and gpu.trainer.benchmark is None
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with open_dict(cfg):
        cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"
    try:
        build_trainer(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_directories(tmp_path, synthetic_root):
    """Run directories carry a per-launch id after the second: launches in the same second never share one, also
    two launches of one SLURM job (the same SLURM_JOB_ID, no array)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": "4242"}
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "segvoc.train", "data=synthetic", "data.synthetic=null", f"data.root={synthetic_root}",
           "debug=smoke", "trainer.max_epochs=1", "data.subset=4", "trainer.enable_progress_bar=false",
           f"paths.output_root={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:]
    runs = sorted(p.parent for p in (tmp_path / "runs").rglob("metrics.json"))
    assert len(runs) == 2 and runs[0] != runs[1] and all("_j4242_" in r.name for r in runs)
    writers = [{f.name.split(".")[-2] for f in (run / "tb").glob("events.out.tfevents.*")} for run in runs]
    assert all(len(pids) == 1 for pids in writers) and writers[0] != writers[1]  # one process's events per run
