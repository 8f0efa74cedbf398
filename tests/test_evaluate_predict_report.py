"""evaluate / predict / report against a real (tiny) training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segvoc.config import compose
from segvoc.data.palette import palette_bytes
from segvoc.data.voc import VOC_CLASSES
from segvoc.evaluate import evaluate
from segvoc.evaluation.inference import InferenceConfig, infer
from segvoc.predict import predict
from segvoc.reporting.study import build_report
from segvoc.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root) -> Path:
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=6",
                   "trainer.max_epochs=2", data_root=synthetic_root)
    train(cfg)
    return out


def _eval(run: Path, out: Path, *extra: str) -> dict:
    cfg = compose([f"ckpt={run}/checkpoints/best.ckpt", f"paths.output_dir={out}", "trainer.accelerator=cpu",
                   "trainer.enable_progress_bar=false", *extra], config_name="evaluate")
    return evaluate(cfg)


def test_evaluate_reproduces_training_test_metrics_exactly(trained_run, tmp_path):
    got = _eval(trained_run, tmp_path)
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == expected
    assert got["test"]["miou"] == expected["miou"]
    table = (tmp_path / "per_class_iou.md").read_text()
    assert "aeroplane" in table and "mIoU" in table


def test_evaluate_scores_a_bf16_run_as_it_was_trained(tmp_path, synthetic_root, monkeypatch):
    """A bf16-mixed run (CPU autocast) is scored in bf16 by evaluate: the test scores of training's metrics.json,
    exactly; typing trainer.precision=32-true scores it in fp32, which gives another loss."""
    import segvoc.runs.evaluation as evaluate_module
    from tests.conftest import make_cfg

    run = tmp_path / "run"
    train(make_cfg(run, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=6",
                   "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                   data_root=synthetic_root))
    expected = json.loads((run / "metrics.json").read_text())["test"]
    assert _eval(run, tmp_path / "bf16")["test"] == expected
    monkeypatch.setattr(evaluate_module, "command_line_overrides", lambda: ["trainer.precision=32-true"])
    fp32 = _eval(run, tmp_path / "fp32", "trainer.precision=32-true")["test"]
    assert fp32["loss"] != pytest.approx(expected["loss"], abs=1e-7)  # bf16 and fp32 differ: the carry matters


def test_per_image_scores_sum_to_the_split_scores(trained_run, tmp_path, capsys):
    from segvoc.evaluation.boundary import boundary_scores_from_counts
    from segvoc.evaluation.calibration import calibration_scores
    from segvoc.evaluation.metrics import scores_from_confusion
    from segvoc.evaluation.statistics import interval_fields
    from segvoc.tables import fmt_ci

    metrics = json.loads((trained_run / "metrics.json").read_text())
    matrices = json.loads((trained_run / "confusion.json").read_text())
    _eval(trained_run, tmp_path)
    shown = fmt_ci(metrics["test"]["miou"], metrics["test"]["ci"]["miou"], metrics["test"]["ci_na"]["miou"])
    assert "[n/a: " in shown and f"mIoU {shown}" in capsys.readouterr().out  # evaluate prints why: too few images
    assert f"| {shown} |" in (trained_run / "MODEL_CARD.md").read_text()  # and the model card shows it
    for run, split in ((trained_run, "val"), (trained_run, "test"), (tmp_path, "test")):
        with np.load(run / f"per_image_{split}.npz") as f:
            ids, conf, bnd, cal = f["ids"].tolist(), f["confusion"], f["boundary"], f["calibration"]
        assert ids == (trained_run / "splits" / f"{split}.txt").read_text().split()
        assert conf.dtype == np.int64 and conf.shape == (len(ids), 21, 21)
        assert conf.sum(0).tolist() == matrices[split]  # exactly the split's matrix
        m = metrics[split]
        assert m["boundary_miou"] == pytest.approx(boundary_scores_from_counts(torch.as_tensor(bnd.sum(0)))
                                                   ["boundary_miou"], abs=1e-12)
        assert m["ece"] == pytest.approx(calibration_scores(torch.as_tensor(cal.sum(0)))["ece"], abs=1e-12)
        assert m["calibration"]["count"] == cal.sum(0)[0].astype(int).tolist()
        assert set(m["ci"]) == {"miou", "pixel_acc", "mean_class_acc", "boundary_miou"}
        assert len(ids) < 10 and m["ci"] == dict.fromkeys(m["ci"])  # too few images for any interval: n/a, and why
        assert m["ci_na"] == dict.fromkeys(m["ci"], f"{len(ids)} images < stats.min_images=10")
        rows = {"confusion": conf, "boundary": bnd, "calibration": cal}  # the same files, the thresholds lowered
        lowered = interval_fields(rows, {"min_images": 1, "min_images_per_class": 0}, m)
        assert lowered["ci_na"] == {}
        for key, (lo, hi) in lowered["ci"].items():
            assert 0 <= lo <= m[key] <= hi <= 1, key
        rows = (run / f"per_image_{split}.csv").read_text().splitlines()
        assert rows[0] == "id,pixels,pixel_acc,miou" and [r.split(",")[0] for r in rows[1:]] == ids
        for row, matrix in zip(rows[1:], conf, strict=True):
            _, pixels, acc, miou = row.split(",")
            s = scores_from_confusion(torch.as_tensor(matrix))
            assert int(pixels) == matrix.sum()
            assert float(acc) == pytest.approx(s["pixel_acc"], abs=1e-6)
            assert float(miou) == pytest.approx(s["miou"], abs=1e-6)


def test_evaluate_val_split_and_flip_tta_run(trained_run, tmp_path):
    val = _eval(trained_run, tmp_path / "v", "split=val")["val"]
    assert val == json.loads((trained_run / "metrics.json").read_text())["val"]
    flip = _eval(trained_run, tmp_path / "f", "tta=flip")["test"]
    # tta= must reach the evaluation: the flip average changes the loss even where the argmax stays the same
    assert flip["loss"] != pytest.approx(json.loads((trained_run / "metrics.json").read_text())["test"]["loss"],
                                         abs=1e-9)
    assert flip["miou"] == pytest.approx(_flip_miou_by_hand(trained_run), abs=1e-12)


def _flip_miou_by_hand(run: Path) -> float:
    return _tta_miou_by_hand(run, "flip")


def _tta_miou_by_hand(run: Path, tta: str) -> float:
    """Test mIoU of the run's best model with the flip (or ms_flip) average computed here: softmax of the image's
    logits and of the mirrored image's mirrored logits (at each scale, resized back), averaged; confusion matrix
    in numpy."""
    from segvoc.engine.builders import load_task

    task, cfg = load_task(run / "checkpoints" / "best.ckpt", InferenceConfig.defaults(tta=tta))
    scales = tuple(task.infer_cfg.scales) if tta == "ms_flip" else (1.0,)
    voc = Path(cfg.data.root) / "VOCdevkit" / "VOC2012"
    cm = np.zeros((21, 21), np.int64)
    for i in (run / "splits" / "test.txt").read_text().split():
        image = torch.from_numpy(np.asarray(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")).copy())
        image = image.permute(2, 0, 1)[None]
        x = task.normalize(image)
        with torch.no_grad():
            p = _ms_flip_by_hand(task.model, x, scales)
            assert torch.allclose(task.predict_log_probs(image).exp(), p, atol=1e-6)  # the probabilities themselves
        pred = p.argmax(1)[0].numpy()
        gt = np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png")).astype(np.int64)
        keep = gt != 255
        np.add.at(cm, (gt[keep], pred[keep]), 1)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


def _write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    sizes = {"rgb": (37, 53), "gray": (41, 29), "rgba": (33, 65)}
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (41, 29), dtype=np.uint8), mode=None).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (33, 65, 4), dtype=np.uint8)).save(folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"garbage")
    return sizes


def test_predict_writes_palette_masks_of_input_size(trained_run, tmp_path):
    sizes = _write_inputs(tmp_path / "in")
    cfg = compose([f"ckpt={trained_run}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                   f"paths.output_dir={tmp_path}"], config_name="predict")
    result = predict(cfg)
    assert len(result["done"]) == 3 and len(result["failed"]) == 1 and "broken.jpg" in result["failed"][0]
    for name, (h, w) in sizes.items():
        with Image.open(tmp_path / "out" / f"{name}.png") as m:
            assert m.mode == "P" and m.size == (w, h)
            assert m.getpalette()[: 3 * 21] == palette_bytes()[: 3 * 21]
            assert np.asarray(m).max() <= 20
        assert (tmp_path / "out" / f"{name}_overlay.png").is_file()


def test_predict_masks_give_evaluate_miou(trained_run, tmp_path, synthetic_root):
    ids = (trained_run / "splits" / "test.txt").read_text().split()
    voc = synthetic_root / "VOCdevkit" / "VOC2012"
    (tmp_path / "in").mkdir()
    for i in ids:
        (tmp_path / "in" / f"{i}.jpg").write_bytes((voc / "JPEGImages" / f"{i}.jpg").read_bytes())
    cfg = compose([f"ckpt={trained_run}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                   f"paths.output_dir={tmp_path}"], config_name="predict")
    predict(cfg)
    cm = np.zeros((21, 21), np.int64)  # an independent numpy confusion matrix
    for i in ids:
        gt = np.array(Image.open(voc / "SegmentationClass" / f"{i}.png")).astype(np.int64)
        pr = np.array(Image.open(tmp_path / "out" / f"{i}.png")).astype(np.int64)
        keep = gt != 255
        np.add.at(cm, (gt[keep], pr[keep]), 1)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    miou = float(np.mean(inter[union > 0] / union[union > 0]))
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]["miou"]
    assert miou == pytest.approx(expected, abs=1e-12)


def test_flip_tta_is_identity_for_a_mirror_symmetric_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 23)
    pointwise = torch.nn.Conv2d(3, 21, 1)  # 1x1 conv: commutes with a horizontal flip
    none = infer(pointwise, x, InferenceConfig.defaults(tta="none"))
    flip = infer(pointwise, x, InferenceConfig.defaults(tta="flip"))
    assert torch.allclose(none, pointwise(x).log_softmax(1), atol=1e-6)
    assert torch.allclose(flip, none, atol=1e-5)
    asymmetric = torch.nn.Conv2d(3, 21, (1, 3), padding=(0, 1))
    p_none = infer(asymmetric, x, InferenceConfig.defaults())
    assert not torch.allclose(infer(asymmetric, x, InferenceConfig.defaults(tta="flip")), p_none, atol=1e-4)


def test_slide_inference_matches_whole_for_pointwise_model():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 70, 90)
    pointwise = torch.nn.Conv2d(3, 21, 1)
    whole = infer(pointwise, x, InferenceConfig.defaults())
    slide = infer(pointwise, x, InferenceConfig.defaults(mode="slide", window=32, stride=20))
    assert torch.allclose(whole, slide, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "window", "stride"), [
    (700, 700, 256, None), (700, 700, 256, 256), (70, 90, 32, 1), (37, 101, 16, 11), (101, 37, 50, 49),
    (40, 60, 100, None), (40, 600, 64, 64), (513, 17, 512, 400)])
def test_slide_windows_cover_every_pixel(h, w, window, stride):
    from segvoc.evaluation.inference import slide_logits

    seen = torch.zeros(h, w)

    def count(crop: torch.Tensor) -> torch.Tensor:
        return torch.ones(crop.shape[0], 2, *crop.shape[-2:])

    cfg = InferenceConfig.defaults(mode="slide", window=window, stride=stride)
    out = slide_logits(count, torch.zeros(1, 3, h, w), cfg.window, cfg.stride)
    seen += out[0, 0]
    assert torch.isfinite(out).all() and (seen == 1).all()  # averaged ones: every pixel had >= 1 window


def test_stride_larger_than_window_is_refused():
    from segvoc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"infer.stride=341 with infer.window=256: windows would leave pixels"):
        InferenceConfig.defaults(mode="slide", window=256, stride=341)
    assert InferenceConfig.defaults(window=256).stride == 170  # the default follows the window


def test_ms_flip_averages_six_passes_at_three_scales():
    x = torch.randn(1, 3, 20, 28)
    sizes = []
    bias = torch.randn(21)

    def constant(inp: torch.Tensor) -> torch.Tensor:  # logits independent of the input: probs = softmax(bias)
        sizes.append(tuple(inp.shape[-2:]))
        return bias.view(1, 21, 1, 1).expand(inp.shape[0], 21, *inp.shape[-2:]).clone()

    probs = infer(constant, x, InferenceConfig.defaults(tta="ms_flip", scales=(0.5, 1.0, 1.5))).exp()
    assert probs.shape == (1, 21, 20, 28)
    assert sorted(set(sizes)) == [(10, 14), (20, 28), (30, 42)] and len(sizes) == 6
    assert torch.allclose(probs, bias.softmax(0).view(1, 21, 1, 1).expand_as(probs), atol=1e-6)
    only_full = infer(constant, x, InferenceConfig.defaults(tta="ms_flip", scales=(1.0,)))
    assert torch.equal(only_full, infer(constant, x, InferenceConfig.defaults(tta="flip")))


def _ms_flip_by_hand(net, x: torch.Tensor, scales: tuple[float, ...], unflip: bool = True) -> torch.Tensor:
    """Softmax averaged over scales x (image, mirrored image); ``unflip=False``: the mirrored pass's logits left
    mirrored (the bug a constant model cannot see)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    total = 0
    for s in scales:
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
        for logits in (net(xs), net(xs.flip(-1)).flip(-1) if unflip else net(xs.flip(-1))):
            total = total + F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
    return total / (2 * len(scales))


def test_ms_flip_mirrors_each_rescaled_pass_back():
    """With a model that is not mirror-symmetric, every rescaled mirrored pass must be mirrored back: the result
    equals the hand computation and differs from the one that forgets to."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 21, (1, 5), padding=(0, 2))
    x = torch.randn(1, 3, 20, 28) + torch.linspace(-2, 2, 28)  # a left-right gradient: mirroring matters
    scales = (0.5, 1.0, 1.5)
    with torch.no_grad():
        probs = infer(net, x, InferenceConfig.defaults(tta="ms_flip", scales=scales)).exp()
        assert torch.allclose(probs, _ms_flip_by_hand(net, x, scales), atol=1e-6)
        assert not torch.allclose(probs, _ms_flip_by_hand(net, x, scales, unflip=False), atol=1e-3)
        # one wrongly mirrored rescaled pass (not the full-scale one) is caught too
        wrong = (_ms_flip_by_hand(net, x, (1.0,)) * 2 + _ms_flip_by_hand(net, x, (0.5, 1.5), unflip=False) * 4) / 6
        assert not torch.allclose(probs, wrong, atol=1e-3)


def test_evaluate_slide_and_ms_flip_on_non_square_images(trained_run, tmp_path):
    """Synthetic images are 80x60: a window smaller than both sides, one larger than the image, and ms_flip."""
    whole = json.loads((trained_run / "metrics.json").read_text())["test"]
    big = _eval(trained_run, tmp_path / "big", "infer.mode=slide", "infer.window=128")["test"]
    assert big["miou"] == whole["miou"]  # one window holds the whole image: the same as whole-image inference
    small = _eval(trained_run, tmp_path / "small", "infer.mode=slide", "infer.window=24", "infer.stride=24")["test"]
    ms = _eval(trained_run, tmp_path / "ms", "tta=ms_flip")["test"]
    for scores in (small, ms):
        assert 0 < scores["miou"] <= 1 and 0 < scores["pixel_acc"] <= 1
    assert ms["miou"] == pytest.approx(_tta_miou_by_hand(trained_run, "ms_flip"), abs=1e-12)


def test_predict_slide_masks_have_the_image_size(trained_run, tmp_path):
    sizes = _write_inputs(tmp_path / "in")
    cfg = compose([f"ckpt={trained_run}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}",
                   f"paths.output_dir={tmp_path}", "infer.mode=slide", "infer.window=16", "tta=ms_flip"],
                  config_name="predict")
    assert len(predict(cfg)["done"]) == 3
    for name, (h, w) in sizes.items():
        assert Image.open(tmp_path / "out" / f"{name}.png").size == (w, h)


@pytest.mark.slow
def test_evaluate_takes_the_same_data_keys_as_train(trained_run, tmp_path, synthetic_root):
    """``data.root=`` / ``data.num_workers=`` mean in evaluate what they mean in train (another copy of the data
    gives the same scores; a missing one is a one-line error naming it)."""
    import shutil
    import subprocess
    import sys

    from segvoc.config import REPO_ROOT

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "segvoc.evaluate", f"ckpt={trained_run}", "trainer=cpu",
                               "trainer.enable_progress_bar=false", *extra], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300)

    r = run(f"data.root={copy}", "data.num_workers=2", f"hydra.run.dir={tmp_path / 'e'}")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "e" / "metrics.json").read_text())["test"]
    assert got == json.loads((trained_run / "metrics.json").read_text())["test"]
    r = run(f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'f'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: VOC 2012 not found at")


def _fake_run(root: Path, name: str, exp: str, val_miou: float, test_miou: float) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"name: {exp}\nmodel:\n  name: fcn_baseline\nloss:\n  name: ce\nscheduler:\n  name: cosine\n"
        "augment:\n  name: report\n")
    per_class = [0.9] + [None] * 20
    metrics = {s: {"loss": 0.5, "miou": m, "pixel_acc": 0.8, "mean_class_acc": 0.4, "per_class_iou": per_class,
                   "epoch": 3} for s, m in (("val", val_miou), ("test", test_miou))}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "confusion.json").write_text(json.dumps({"test": np.eye(21, dtype=int).tolist()}))
    w = SummaryWriter(str(run / "tb"))
    for epoch, (tl, vl) in enumerate([(1.0, 1.1), (0.7, 0.9), (0.5, 0.8)]):
        w.add_scalar("train/loss_epoch", tl, epoch)
        w.add_scalar("val/loss", vl, epoch)
    w.close()
    return run


def test_report_tables_and_figures_from_fake_runs(tmp_path):
    _fake_run(tmp_path / "sweep", "0_a", "4a_baseline", 0.31, 0.29)
    _fake_run(tmp_path / "sweep", "1_b", "4b_improved", 0.12, 0.11)
    published = compose(["paths.output_dir=/tmp", "sweep=x"], config_name="report").published
    result = build_report(str(tmp_path / "sweep"), tmp_path / "rep", dict(published), num_images=2)
    csv_rows = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("run,experiment,model,loss_fn,scheduler,augment,best_epoch")
    assert "0_a,4a_baseline,fcn_baseline,ce,cosine,report,3" in csv_rows[1] and "0.310000" in csv_rows[1]
    assert "0.290000" in csv_rows[1] and "0.110000" in csv_rows[2]
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| 4a_baseline | 0.3100 | 0.2314 |" in md  # ours beside Table 4
    assert "| 4b_improved | 0.1200 | 0.0511 |" in md  # ours beside Table 5
    assert sorted(result["figures"]) == ["0_a_confusion.png", "0_a_loss.png", "1_b_confusion.png", "1_b_loss.png",
                                        "per_class_iou_by_group.png"]
    for f in result["figures"]:
        with Image.open(tmp_path / "rep" / f) as im:
            assert im.size[0] > 100


def test_report_on_real_run_draws_predictions(trained_run, tmp_path):
    published = compose(["paths.output_dir=/tmp", "sweep=x"], config_name="report").published
    result = build_report(str(trained_run), tmp_path, dict(published), num_images=2)
    assert f"{trained_run.name}_predictions.png" in result["figures"]
    assert f"{trained_run.name}_loss.png" in result["figures"]


def _seed_run(root: Path, name: str, weights: str, seed: int, test_miou: float, iou_cat: float | None) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"name: 4c_weighted\nseed: {seed}\nmodel:\n  name: fcn_baseline\nloss:\n  name: weighted_ce\n"
        f"  class_weights: {weights}\nscheduler:\n  name: cosine\naugment:\n  name: report\n")
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=4c_weighted\n- loss.class_weights={weights}\n- seed={seed}\n- data=synthetic\n")
    per_class = [0.9, None, None, None, None, None, None, None, iou_cat] + [None] * 12
    metrics = {s: {"loss": 0.5, "miou": test_miou + (0.1 if s == "val" else 0), "pixel_acc": 0.8,
                   "mean_class_acc": 0.5, "per_class_iou": per_class, "epoch": 1} for s in ("val", "test")}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_groups_seeds_with_mean_and_sample_std(tmp_path):
    """The loss-weighting study: runs identical but for seed form a group; mean and sample std (n-1) by hand."""
    import csv

    sweep = tmp_path / "sweep"
    for k, (weights, seed, miou, cat) in enumerate([("none", 0, 0.50, 0.2), ("none", 1, 0.60, 0.4),
                                                    ("none", 2, 0.70, None), ("median_frequency", 0, 0.40, 0.6)]):
        _seed_run(sweep, f"{k}_run", weights, seed, miou, cat)
    result = build_report(str(sweep), tmp_path / "out", published={}, num_images=0)
    assert result["groups"] == ["loss.class_weights=none", "loss.class_weights=median_frequency"]
    rows = {r["group"]: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    none = rows["loss.class_weights=none"]
    assert none["n"] == "3"
    assert float(none["test_miou_mean"]) == pytest.approx(0.6)
    assert float(none["test_miou_std"]) == pytest.approx(0.1)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert float(none["val_miou_mean"]) == pytest.approx(0.7)
    assert float(none["iou_cat_mean"]) == pytest.approx(0.3)  # the run where cat was absent does not count
    single = rows["loss.class_weights=median_frequency"]
    assert single["n"] == "1" and single["test_miou_std"] == "" and float(single["test_miou_mean"]) == 0.4
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| loss.class_weights=none | 3 | 0,1,2 | 0.700 ± 0.100 |" in md
    assert "per_class_iou_by_group.png" in result["figures"]


def test_predict_and_evaluate_configs_apply_tta_and_infer_keys():
    """The primary config's own keys (``tta=``, predict's ``infer.mode: auto``) win over ``conf/infer``."""
    pred = compose(["ckpt=x", "input=y", "tta=flip"], config_name="predict")
    assert (pred.infer.tta, pred.infer.mode) == ("flip", "auto")
    assert compose(["ckpt=x", "tta=ms_flip"], config_name="evaluate").infer.tta == "ms_flip"


def test_loss_curves_are_titled_by_group_and_seed_with_integer_epochs_and_val_miou(trained_run, tmp_path,
                                                                                  monkeypatch):
    from matplotlib.figure import Figure

    from segvoc.reporting.study import Run, loss_curve_png

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    run = Run(trained_run, json.loads((trained_run / "metrics.json").read_text()))
    assert loss_curve_png(run, tmp_path / "loss.png", "loss=dice, seed 1")
    ax, right = drawn[0].axes
    assert ax.get_title() == "loss=dice, seed 1"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "val loss", "val mIoU"]
    assert right.get_ylabel() == "val mIoU" and len(right.lines[0].get_ydata()) == 2  # one per epoch
    from segvoc.reporting.study import read_scalars

    logged = read_scalars(trained_run, ("val/boundary_miou", "val/ece"))  # TensorBoard, each validation epoch
    assert len(logged["val/boundary_miou"]) == 2 and len(logged["val/ece"]) == 2


def test_report_prediction_grid_has_column_titles_legend_and_the_run_label(trained_run, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from segvoc.evaluation.figures import PANELS, class_color
    from segvoc.reporting.study import Run, predictions_png

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    run = Run(trained_run, json.loads((trained_run / "metrics.json").read_text()), {"name": "4a_baseline", "seed": 1})
    assert predictions_png(run, 2, tmp_path / "p.png")
    fig = drawn[0]
    assert fig.get_suptitle() == f"4a_baseline, seed 1 ({trained_run.name}): validation images"
    assert [ax.get_title() for ax in fig.axes[:4]] == list(PANELS) and len(fig.axes) == 8
    legend = [t.get_text().removesuffix(" (outlined)") for t in fig.legends[0].get_texts()]
    shown = set()  # the classes in the truths and predictions drawn (panels 1 and 2 of each row, figure colours)
    colours = {class_color(c): name for c, name in enumerate(VOC_CLASSES)}
    for ax in fig.axes[1::4] + fig.axes[2::4]:
        pixels = np.asarray(ax.images[0].get_array()).reshape(-1, 3)
        shown |= {colours[tuple(int(v) for v in p)] for p in np.unique(pixels, axis=0) if tuple(p) in colours}
    assert set(legend) - {"void (255)"} == shown and legend  # exactly what appears, nothing else


def test_tensorboard_prediction_grid_is_a_titled_figure(trained_run):
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from pytorch_lightning.loggers import TensorBoardLogger

    from segvoc.engine.builders import load_task
    from segvoc.engine.callbacks import ValidationFigures

    task, cfg = load_task(trained_run / "checkpoints" / "best.ckpt")
    tb = MagicMock(spec=TensorBoardLogger)
    trainer = SimpleNamespace(loggers=[tb], is_global_zero=True, current_epoch=3, sanity_checking=False,
                              state=SimpleNamespace(fn="fit"))
    image = torch.zeros(2, 3, 8, 10, dtype=torch.uint8)
    mask = torch.zeros(2, 8, 10, dtype=torch.long)
    mask[0, 2:4, 2:4] = 8
    figures_cb = ValidationFigures(num_images=1)
    task.scores["val"] = {"confusion": np.eye(21, dtype=np.int64)}
    # a batch of two, of which the callback keeps the first; an all-background prediction
    figures_cb.on_validation_batch_end(trainer, task, torch.zeros(2, 8, 10, dtype=torch.long),
                                       {"image": image, "mask": mask}, 0)
    figures_cb.on_validation_end(trainer, task)
    figures = {c.args[0]: c.args[1] for c in tb.experiment.add_figure.call_args_list}
    assert not tb.experiment.add_image.called
    fig = figures["val/predictions"]
    assert fig.get_suptitle() == f"{cfg.name}, seed {cfg.seed} ({Path(cfg.paths.output_dir).name}), epoch 3"
    # cat's colour (64, 0, 0) is too dark to see on black: its patches carry an outline, its label says so
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["background", "cat (outlined)"]
    assert "val/confusion_matrix" in figures


def test_failure_gallery_reruns_the_worst_test_images_through_the_checkpoint(trained_run, tmp_path):
    import csv

    from segvoc.reporting.gallery import rerun_images
    from segvoc.runs.directory import read_per_image

    result = build_report(str(trained_run), tmp_path, {}, num_images=0, gallery=2)
    assert "failure_gallery.png" in result["figures"] and (tmp_path / "failure_gallery.png").is_file()
    rows = list(csv.DictReader((trained_run / "per_image_test.csv").open()))
    expect = sorted((r for r in rows if r["miou"]), key=lambda r: float(r["miou"]))[:2]  # stable: split order
    md = (tmp_path / "results.md").read_text()
    gallery = md[md.index("## Failure gallery"):]
    table = [line.split(" | ") for line in gallery.splitlines() if line.startswith("| ") and "per-image" not in line]
    assert [(c[0][2:], c[1]) for c in table] == [(r["id"], f"{float(r['miou']):.4f}") for r in expect]
    ids, per_image = read_per_image(trained_run, "test")
    for cells, r in zip(table, expect, strict=True):
        m = per_image["confusion"][ids.index(r["id"])].copy()
        np.fill_diagonal(m, -1)
        t, p = np.unravel_index(np.argmax(m), m.shape)  # the image's largest off-diagonal entry, by hand
        pair = f"{VOC_CLASSES[t]} → {VOC_CLASSES[p]} ({m[t, p]} px)" if m[t, p] > 0 else "-"
        assert cells[2].rstrip(" |") == pair
    # the rerun predictions are the ones that were scored: their confusion equals the stored per-image rows
    for i, _, truth, pred in rerun_images(trained_run, [r["id"] for r in expect])[0]:
        valid = truth != 255
        got = np.bincount(21 * truth[valid].astype(np.int64) + pred[valid], minlength=21 * 21).reshape(21, 21)
        np.testing.assert_array_equal(got, per_image["confusion"][ids.index(i)])


def test_report_config_sets_the_gallery_size(trained_run, tmp_path):
    from segvoc.report import report

    assert compose(["sweep=x"], config_name="report").gallery == 8
    for n in (1, 0):
        out = tmp_path / str(n)
        report(compose([f"sweep={trained_run}", f"output={out}", f"paths.output_dir={out}", "num_images=0",
                        f"gallery={n}"], config_name="report"))
        md = (out / "results.md").read_text()
        rows = md[md.index("## Failure gallery"):].count("| syn_") if n else 0
        assert ("## Failure gallery" in md, rows) == (n > 0, n)
