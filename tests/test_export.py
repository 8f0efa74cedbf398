"""segvoc.export: ONNX/TorchScript parity for every model in conf/model, exported files in evaluate/predict,
TorchScript without segvoc, and the model card."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segvoc.config import CONF_DIR, compose
from segvoc.deploy.exported import load_any_task, load_runner
from segvoc.deploy.exporting import decided_pixels, export, export_metadata
from segvoc.engine.builders import build_task
from segvoc.errors import ConfigError
from segvoc.evaluate import evaluate
from segvoc.export import export_model
from segvoc.predict import predict
from segvoc.train import train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _perturb_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial running statistics, as a trained model has, so logits are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


REPORT_MODELS = ("fcn_baseline", "fcn_dilated", "resnet34_transfer", "unet")


@pytest.mark.slow
@pytest.mark.parametrize("fmt_", ["onnx", "torchscript"])
@pytest.mark.parametrize("model", MODELS)
def test_export_matches_pytorch_on_odd_sizes(model, fmt_, tmp_path):
    """The report models: logits within 1e-4 of the task's own forward pass and the same argmax everywhere, also at
    VOC's size; the references within conf/export.yaml's measured, looser tolerance."""
    from segvoc.deploy.exporting import parity_tolerance

    cfg = compose([f"model={model}", f"paths.output_dir={tmp_path}"])
    torch.manual_seed(0)  # the weights the tolerances were measured with, whatever ran before in this process
    task = build_task(cfg, pretrained=False).eval()
    _perturb_statistics(task.model)
    tolerance = parity_tolerance(compose(["ckpt=x"], config_name="export"), model)
    assert tolerance["min_agreement"] == 1.0
    assert tolerance["max_abs_diff"] == 1e-4 or model not in REPORT_MODELS
    path = tmp_path / f"model{'.onnx' if fmt_ == 'onnx' else '.pt'}"
    export(task, path, fmt_, export_metadata(task, tmp_path, None), **tolerance)
    run = load_runner(path)
    g = torch.Generator().manual_seed(3)
    for h, w in ((97, 131), (375, 500)):
        images = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            reference = task._logits(task.normalize(images))  # the path training-time evaluation takes
        got = run(images)
        assert got.shape == reference.shape == (1, 21, h, w)
        diff = float((got - reference).abs().max())
        same = got.argmax(1) == reference.argmax(1)
        raw = float(same.float().mean())
        # random-weight logits hold near-ties (at 375x500 one pixel in 187,500 was measured to flip for
        # deeplabv3_resnet50 onnx and smp torchscript): agreement counts the pixels the tolerance decides
        decided = decided_pixels(reference, tolerance["max_abs_diff"])
        agree = float((same | ~decided).float().mean())
        print(f"PARITY {model} {fmt_} {h}x{w}: max abs logit diff {diff:.3g}, argmax agreement {agree:.6f} "
              f"(all pixels {raw:.6f}, tied {1 - float(decided.float().mean()):.2g})")
        assert agree >= tolerance["min_agreement"], (model, fmt_, h, w, agree)
        assert diff <= tolerance["max_abs_diff"], (model, fmt_, h, w, diff)


@pytest.mark.parametrize("fmt_", [pytest.param("onnx", marks=pytest.mark.slow), "torchscript"])
def test_export_with_a_wrong_normalisation_fails_and_keeps_the_old_file(fmt_, tmp_path, monkeypatch):
    """Parity is checked against the task itself, not against the wrapper that was exported: a DeployModel whose
    std is 5 % off must fail, before the temporary file replaces an earlier export (which stays as it was)."""
    import segvoc.deploy.exporting as exporting
    from segvoc.errors import ExportError

    cfg = compose(["model=fcn_baseline", f"paths.output_dir={tmp_path}"])
    torch.manual_seed(0)  # the same weights whatever ran before in this process
    task = build_task(cfg, pretrained=False).eval()
    _perturb_statistics(task.model)
    path = tmp_path / f"model{'.onnx' if fmt_ == 'onnx' else '.pt'}"
    good = export(task, path, fmt_, export_metadata(task, tmp_path, None))
    assert good.max_abs_diff <= 1e-4 and good.argmax_agreement == 1.0
    before = path.read_bytes()
    right = exporting.deploy_model

    def wrong(task, returns="logits"):
        module = right(task, returns)
        with torch.no_grad():
            module.scale.mul_(1 / 1.05)  # std 5 % too large
        return module

    monkeypatch.setattr(exporting, "deploy_model", wrong)
    with pytest.raises(ExportError, match=r"max abs logit difference .* \(allowed 0.0001\)"):
        export(task, path, fmt_, export_metadata(task, tmp_path, None))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_parity_leaves_out_only_pixels_that_tie_within_the_tolerance(tmp_path):
    """A mask that differs from the task's argmax where the top two logits lie within 2 x tolerance passes (any
    file within the tolerance may flip such a tie); one differing pixel whose classes are further apart fails."""
    from segvoc.deploy.exporting import check_parity, reference_logits
    from segvoc.errors import ExportError

    torch.manual_seed(0)
    task = build_task(compose(["model=fcn_baseline", f"paths.output_dir={tmp_path}"]), pretrained=False).eval()
    sizes = ((33, 47),)
    images = torch.randint(0, 256, (2, 3, 33, 47), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = reference_logits(task, images)
    top2 = reference.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    tolerance = float(margin.median()) / 2  # half of the pixels tie at this tolerance
    decided = decided_pixels(reference, tolerance)
    assert 0.3 < float(decided.float().mean()) < 0.7

    def runner(flip: torch.Tensor):
        def run(x: torch.Tensor) -> torch.Tensor:
            assert torch.equal(x, images)  # the check draws the same images (seed 0) as this test
            return torch.where(flip, top2.indices[:, 1], top2.indices[:, 0])
        return run

    first_tied = torch.zeros_like(decided).flatten()
    first_tied[int((~decided).flatten().nonzero()[0])] = True
    first_decided = torch.zeros_like(decided).flatten()
    first_decided[int(decided.flatten().nonzero()[0])] = True
    ok = check_parity(task, runner(first_tied.view_as(decided)), "mask", sizes=sizes, max_abs_diff=tolerance)
    assert ok.argmax_agreement == 1.0 and ok.tied_fraction == pytest.approx(1 - float(decided.float().mean()))
    with pytest.raises(ExportError, match=r"argmax agreement 0\.99\d+ \(required 1; 0\.\d+ of the pixels tie"):
        check_parity(task, runner(first_decided.view_as(decided)), "mask", sizes=sizes, max_abs_diff=tolerance)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root) -> Path:
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=6",
                   "trainer.max_epochs=2", "loss.class_weights=median_frequency", data_root=synthetic_root)
    train(cfg)
    return out


def _export(run: Path, fmt_: str, out: Path, *extra: str) -> Path:
    return export_model(compose([f"ckpt={run}", f"format={fmt_}", f"output={out}", *extra], config_name="export"))


def _evaluate(ckpt: Path, out: Path, *extra: str) -> dict:
    cfg = compose([f"ckpt={ckpt}", f"paths.output_dir={out}", "trainer.accelerator=cpu",
                   "trainer.enable_progress_bar=false", *extra], config_name="evaluate")
    return evaluate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("fmt_", ["onnx", "torchscript"])
def test_evaluate_and_predict_accept_exported_models(trained_run, tmp_path, fmt_):
    exported = _export(trained_run, fmt_, tmp_path / "export" / f"model{'.onnx' if fmt_ == 'onnx' else '.pt'}")
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]
    got = _evaluate(exported, tmp_path / "eval")["test"]
    print(f"EVAL {fmt_}: test mIoU exported {got['miou']:.6f} checkpoint {expected['miou']:.6f}")
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-4)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-4)  # the class-weighted loss travels too
    flip = _evaluate(exported, tmp_path / "flip", "tta=flip")["test"]
    assert flip["miou"] == pytest.approx(_evaluate(trained_run, tmp_path / "flip_ckpt", "tta=flip")["test"]["miou"],
                                         abs=1e-4)
    # predict: the exported file gives the checkpoint's masks
    image = np.random.default_rng(0).integers(0, 256, (75, 113, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "img.png")
    masks = {}
    for name, ckpt in (("ckpt", trained_run), ("exported", exported)):
        predict(compose([f"ckpt={ckpt}", f"input={tmp_path / 'img.png'}", f"output={tmp_path / name}",
                         "device=cpu"], config_name="predict"))
        masks[name] = np.array(Image.open(tmp_path / name / "img.png"))
    assert masks["exported"].shape == (75, 113)
    assert (masks["exported"] == masks["ckpt"]).mean() >= 0.999


def test_exported_file_refuses_what_it_cannot_do(trained_run, tmp_path):
    mask_file = _export(trained_run, "onnx", tmp_path / "mask.onnx", "returns=mask")
    with pytest.raises(ConfigError, match="returns=logits"):
        load_any_task(mask_file)
    logits_file = _export(trained_run, "onnx", tmp_path / "logits.onnx")
    with pytest.raises(ConfigError, match="tta=ms_flip"):
        _evaluate(logits_file, tmp_path / "e", "tta=ms_flip")
    with pytest.raises(ConfigError, match="must end in .pt"):
        _export(trained_run, "torchscript", tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="already an exported file"):
        export_model(compose([f"ckpt={logits_file}"], config_name="export"))
    # returns=mask: the argmax inside the graph equals the argmax of the logits file
    images = torch.randint(0, 256, (2, 3, 61, 77), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_runner(mask_file)(images), load_runner(logits_file)(images).argmax(1))


BLOCK_SEGVOC = """
import importlib.abc, sys
class NoSegvoc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "segvoc":
            raise ImportError("segvoc is not importable in this test")
sys.meta_path.insert(0, NoSegvoc())
"""


def test_torchscript_runs_with_only_torch(trained_run, tmp_path):
    path = _export(trained_run, "torchscript", tmp_path / "model.pt")
    code = BLOCK_SEGVOC + f"""
import torch
model = torch.jit.load({str(path)!r})
images = torch.randint(0, 256, (2, 3, 97, 131), dtype=torch.uint8)
logits = model(images)
assert tuple(logits.shape) == (2, 21, 97, 131), logits.shape
assert not [m for m in sys.modules if m.startswith("segvoc")]
print("ran", tuple(logits.shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ran (2, 21, 97, 131)" in proc.stdout


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """Rows of the first markdown table after ``heading``: first cell -> other cells."""
    rows = {}
    body = text.split(heading, 1)[1]
    for line in body.splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in ("---", "") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def _shows(cell: str, value: float | None) -> bool:
    """``cell`` shows ``value`` with 4 decimals (``-`` for a class without IoU), read back independently of the
    ``fmt`` that wrote the card."""
    if value is None:
        return cell == "-"
    return re.fullmatch(r"-?\d+\.\d{4}", cell) is not None and abs(float(cell) - value) <= 5e-5 + 1e-12


def test_model_card_numbers_equal_metrics_json(trained_run, tmp_path):
    card = (trained_run / "MODEL_CARD.md").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    results = _table(card, "## Results")
    for split in ("val", "test"):
        m = metrics[split]
        cells = results[split]
        for cell, key in zip(cells[:4], ("miou", "pixel_acc", "mean_class_acc", "boundary_miou"), strict=True):
            value, _, interval = cell.partition(" ")  # "0.1234 [0.1000, 0.2000]": the score, then its interval
            assert _shows(value, m[key]), (split, key, cell, m[key])
            if m["ci"][key] is None:  # "0.1234 [n/a: 6 images < stats.min_images=10]": why there is none
                assert interval == f"[n/a: {m['ci_na'][key]}]", (split, key, cell)
                continue
            lo, hi = (float(x) for x in interval.strip("[]").split(", "))
            assert abs(lo - m["ci"][key][0]) <= 5e-5 and abs(hi - m["ci"][key][1]) <= 5e-5, (split, key, cell)
        for cell, key in zip(cells[4:6], ("ece", "loss"), strict=True):
            assert _shows(cell, m[key]), (split, key, cell, m[key])
    per_class = _table(card, "Per-class IoU:")
    assert len(per_class) == 22  # header row + 21 classes
    for k, name in enumerate(per_class_names := list(per_class)[1:]):
        for cell, split in zip(per_class[name], ("val", "test"), strict=True):
            assert _shows(cell, metrics[split]["per_class_iou"][k]), (name, split, cell)
    assert per_class_names[0] == "background"
    assert sum(c != "-" for row in list(per_class.values())[1:] for c in row) >= 4  # numbers, not only dashes
    weights = json.loads((trained_run / "class_weights.json").read_text())
    rows = _table(card, "## Class weights (median_frequency)")
    assert _shows(rows["aeroplane"][0], weights["weights"][1]) and rows["aeroplane"][1] == str(weights["counts"][1])
    splits = _table(card, "Split lists used")
    for split in ("train", "val", "test"):
        ids = (trained_run / "splits" / f"{split}.txt").read_text().split()
        assert splits[split][0] == str(len(ids))
        import hashlib

        assert splits[split][1] == hashlib.sha256((trained_run / "splits" / f"{split}.txt").read_bytes()).hexdigest()
    assert re.search(r"\| parameters \(total\) \| [\d,]+ \|", card)
    assert "data.subset=6" in card
    assert "Not launched from the command line" in card


def test_model_card_command_comes_from_hydra_overrides(trained_run, tmp_path):
    import shutil

    from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint
    from segvoc.runs.model_card import model_card

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("- debug=smoke\n- loss.class_weights=median_frequency\n")
    cfg = checkpoint_config(read_checkpoint(trained_run))
    card = model_card(run, cfg, torch.nn.Linear(2, 3), None, "cpu")
    assert "python -m segvoc.train debug=smoke loss.class_weights=median_frequency" in card
    assert "| parameters (total) | 9 |" in card


def test_export_copies_model_card_with_export_section(trained_run, tmp_path):
    path = _export(trained_run, "onnx", tmp_path / "out" / "m.onnx")
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert card.startswith((trained_run / "MODEL_CARD.md").read_text())
    assert re.search(r"## Export: `m\.onnx`.*opset 18.*max abs logit difference [0-9.e-]+, argmax agreement 1\.0",
                     card, re.S)


def test_model_card_caveat_for_untrained_encoder():
    from segvoc.runs.model_card import caveats

    assert any("weights=none" in c for c in caveats(compose(["model=resnet34_transfer", "model.weights=none"])))
    assert not caveats(compose(["model=resnet34_transfer", "model.weights=imagenet"]))
