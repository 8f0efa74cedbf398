"""Your own data (``data=folder``): the checker finds each labelling mistake users make, training refuses what it
calls an error, and a folder dataset runs end to end (check, train, evaluate, predict, report) with its own class
names in every output and no VOC name anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segvoc.config import REPO_ROOT, compose
from segvoc.data.tree_check import check_dataset
from segvoc.errors import ConfigError, DatasetError
from tests.folder_data import make_folder_dataset

NAMES = ["sky", "water", "boat", "dock", "buoy"]  # no VOC name among them
VOC_NAMES = ("aeroplane", "bicycle", "bird", "bottle", "bus", "chair", "cow", "diningtable", "horse", "motorbike",
             "pottedplant", "sheep", "sofa", "tvmonitor")


def _data(root: Path, *extra: str):
    return compose(["data=folder", f"data.root={root}", "paths.output_dir=/tmp/x", *extra]).data


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "data", NAMES, n=9)


def _one(report: dict, kind: str) -> str:
    assert len(report[kind]) == 1, report[kind]
    return report[kind][0]


# ---- the checker: one test per planted mistake ----------------------------------------------------------------------

def test_a_clean_folder_has_no_error_and_its_own_class_table(folder, capsys):
    from segvoc.data.tree_check import print_summary

    report = check_dataset(_data(folder), progress=False)
    assert report["errors"] == [] and report["classes"] == NAMES
    print_summary(report)
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in NAMES) and "no errors found" in out


def test_checker_gives_a_mask_value_beyond_the_classes_with_its_pixel_count(folder):
    mask = np.array(Image.open(folder / "masks" / "scene_004.png"))
    mask[:3, :5] = 7  # 15 pixels of a class that does not exist (5 classes: 0-4)
    Image.fromarray(mask, mode="L").save(folder / "masks" / "scene_004.png")
    error = _one(check_dataset(_data(folder), progress=False), "errors")
    assert error.startswith(f"{folder / 'masks' / 'scene_004.png'}: values 7 (15 px)") and "(0-4)" in error


def test_checker_names_an_image_without_a_mask_and_a_mask_without_an_image(folder):
    (folder / "masks" / "scene_002.png").unlink()
    shutil.copy(folder / "masks" / "scene_003.png", folder / "masks" / "orphan.png")
    errors = check_dataset(_data(folder), progress=False)["errors"]
    assert len(errors) == 2, errors
    assert any("scene_002.jpg: no mask" in e for e in errors) and any("orphan.png: no image" in e for e in errors)


def test_checker_names_an_image_and_mask_of_different_sizes(folder):
    Image.open(folder / "masks" / "scene_001.png").crop((0, 0, 20, 20)).save(folder / "masks" / "scene_001.png")
    assert "scene_001.png: mask is 20x20 but its image is" in _one(check_dataset(_data(folder), progress=False),
                                                                   "errors")


def test_checker_names_an_unreadable_file(folder):
    (folder / "images" / "scene_002.jpg").write_bytes(b"not an image at all")
    assert "scene_002.jpg: cannot decode image" in _one(check_dataset(_data(folder), progress=False), "errors")


def test_checker_names_an_id_with_two_image_files(folder):
    shutil.copy(folder / "images" / "scene_002.jpg", folder / "images" / "scene_002.png")
    assert "id scene_002 has 2 image files (scene_002.jpg, scene_002.png)" in _one(
        check_dataset(_data(folder), progress=False), "errors")


def test_checker_refuses_a_colour_mask_without_colors_and_reads_it_with_them(folder):
    mask = np.array(Image.open(folder / "masks" / "scene_000.png"))
    palette = np.array([[0, 0, 0], [0, 0, 255], [255, 0, 0], [0, 255, 0], [255, 255, 0]], np.uint8)
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask < 5] = palette[mask[mask < 5]]
    rgb[mask == 255] = (224, 224, 192)  # the ignore label's colour (VOC's)
    Image.fromarray(rgb).save(folder / "masks" / "scene_000.png")
    error = _one(check_dataset(_data(folder), progress=False), "errors")
    assert "scene_000.png: mask is a colour image and classes.yaml gives no colors" in error
    classes = yaml.safe_load((folder / "classes.yaml").read_text())
    (folder / "classes.yaml").write_text(yaml.safe_dump({**classes, "colors": palette.tolist()}))
    report = check_dataset(_data(folder), progress=False)
    assert report["errors"] == []
    from segvoc.data.io import load_mask

    assert np.array_equal(load_mask(folder / "masks" / "scene_000.png", 5, 255, palette.tolist()), mask)


def test_checker_warns_of_the_reduce_zero_label_mistake(folder):
    for path in (folder / "masks").glob("*.png"):  # labels 1..N, as datasets without a background class store them
        mask = np.array(Image.open(path))
        Image.fromarray(np.where(mask == 255, 255, mask + 1).astype(np.uint8), mode="L").save(path)
    report = check_dataset(_data(folder), progress=False)
    assert any("values 5 (" in e for e in report["errors"])  # 5 is beyond the classes: an error as well
    assert any("no pixel of class 0 (sky)" in w and "the reduce-zero-label mistake" in w for w in report["warnings"])


def test_checker_warns_of_a_class_with_no_pixel_in_train_and_an_all_ignore_mask(tmp_path):
    root = make_folder_dataset(tmp_path / "data", NAMES, n=9, splits={
        "train": ["scene_000", "scene_001", "scene_002", "scene_003"], "val": ["scene_004", "scene_005"],
        "test": ["scene_006"]})
    for i in ("scene_000", "scene_001", "scene_002", "scene_003"):  # train: no buoy
        path = root / "masks" / f"{i}.png"
        mask = np.array(Image.open(path))
        mask[mask == 4] = 0
        Image.fromarray(mask, mode="L").save(path)
    Image.fromarray(np.full((45, 61), 255, np.uint8), mode="L").save(root / "masks" / "scene_006.png")
    Image.new("RGB", (61, 45)).save(root / "images" / "scene_006.png")
    (root / "images" / "scene_006.jpg").unlink()
    report = check_dataset(_data(root), progress=False)
    assert report["errors"] == [], report["errors"]
    assert report["warnings"] == [
        f"{root / 'masks' / 'scene_006.png'}: every pixel is the ignore label 255; the image teaches nothing",
        "no pixel of buoy in the training masks: the model never sees it"]


def test_the_voc_checker_finds_a_mask_of_all_50s(voc_mini, tmp_path):
    """The 0.4 checker passed it and training then refused it: one code path now for both."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc_mini, root)
    path = root / "SegmentationClass" / "2007_000039.png"
    size = Image.open(path).size
    Image.fromarray(np.full(size[::-1], 50, np.uint8), mode="L").save(path)
    error = _one(check_dataset({"root": tmp_path}, progress=False), "errors")
    assert error.startswith(f"{path}: values 50 ({size[0] * size[1]} px) are neither a class (0-20)")


# ---- training refuses what the checker calls an error, in one line ---------------------------------------------------

def test_training_refuses_the_checker_s_errors_in_one_line(folder, tmp_path, capsys):
    from segvoc.app import run_app
    from segvoc.train import train
    from tests.conftest import make_cfg

    shutil.copy(folder / "images" / "scene_002.jpg", folder / "images" / "scene_002.png")
    cfg = make_cfg(tmp_path / "run", "data=folder", "debug=smoke", "trainer.max_epochs=1", data_root=folder)
    with pytest.raises(SystemExit) as exc:
        run_app(train, cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {folder}: 1 image/mask problems (first: ") and "has 2 image files" in err[0]
    assert "python -m segvoc.data.check data=folder" in err[0]


def test_num_classes_comes_from_classes_yaml_and_a_disagreeing_override_is_refused(folder):
    from segvoc.data.layouts import dataset_classes, with_classes

    assert dataset_classes(_data(folder)).names == tuple(NAMES)
    cfg = compose(["data=folder", f"data.root={folder}", "paths.output_dir=/tmp/x"])
    assert with_classes(cfg).data.num_classes == 5 and list(with_classes(cfg).data.class_names) == NAMES
    with pytest.raises(ConfigError, match=rf"^data.num_classes=3: {folder}/classes.yaml names 5 classes; drop"):
        dataset_classes(_data(folder, "data.num_classes=3"))
    (folder / "classes.yaml").write_text("names: [only_one]\n")
    with pytest.raises(DatasetError, match="names must be a list of at least 2 class names"):
        dataset_classes(_data(folder))


def test_without_splits_the_ids_are_split_by_the_seeded_fractions(tmp_path):
    from segvoc.data.layouts import open_layout

    root = make_folder_dataset(tmp_path / "data", ["bg", "thing"], n=20)
    splits = open_layout(_data(root, "data.val_fraction=0.2", "data.test_fraction=0.25")).splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [11, 4, 5]
    assert sorted(sum(splits.values(), [])) == sorted(f"scene_{k:03d}" for k in range(20))
    again = open_layout(_data(root, "data.val_fraction=0.2", "data.test_fraction=0.25")).splits()
    other = open_layout(_data(root, "data.val_fraction=0.2", "data.test_fraction=0.25", "data.split_seed=1")).splits()
    assert again == splits and other != splits


# ---- end to end ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-class folder dataset (odd sizes, L and P masks, .jpg and .png images) and a run trained on it."""
    from segvoc.train import train
    from tests.conftest import make_cfg

    base = tmp_path_factory.mktemp("folder2")
    root = make_folder_dataset(base / "data", ["land", "lake"], n=12, colors=[[20, 120, 20], [30, 60, 220]])
    train(make_cfg(base / "run", "data=folder", "debug=smoke", "data.image_size=32", "trainer.max_epochs=3",
                   "data.val_fraction=0.25", "data.test_fraction=0.25", "stats.min_images=2",
                   "stats.min_images_per_class=1", data_root=root))
    return root, base / "run"


def _no_voc_name_in(folder: Path) -> int:
    """No VOC class name in any text a run or command wrote, in a checkpoint's stored config, or in a TensorBoard
    tag (binary files are read where they hold text: random weight bytes may spell "bus")."""
    import torch

    texts = {}
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".md", ".csv", ".yaml", ".txt", ".log"):
            texts[path] = path.read_text(errors="replace")
        elif path.suffix == ".ckpt":
            texts[path] = json.dumps(torch.load(path, weights_only=True)["hyper_parameters"], default=str)
        elif path.name.startswith("events.out.tfevents"):
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            acc = EventAccumulator(str(path))
            acc.Reload()
            texts[path] = " ".join(sum((list(v) for v in acc.Tags().values() if isinstance(v, list)), []))
    for path, text in texts.items():
        assert not any(name in text for name in VOC_NAMES), path
    return len(texts)


def test_a_folder_run_carries_its_class_names_everywhere(two_class_run, tmp_path):
    from segvoc.evaluate import evaluate
    from segvoc.export import export_model
    from segvoc.predict import predict
    from segvoc.reporting.study import build_report

    root, run = two_class_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["classes"] == ["land", "lake"] and len(metrics["test"]["per_class_iou"]) == 2
    assert "| land |" in (run / "MODEL_CARD.md").read_text() and "2: land, lake" in (run / "MODEL_CARD.md").read_text()
    evaluated = evaluate(compose([f"ckpt={run}", f"paths.output_dir={tmp_path / 'e'}", "stats.min_images=2",
                                  "stats.min_images_per_class=1"], config_name="evaluate"))["test"]
    assert evaluated["miou"] == metrics["test"]["miou"]
    assert "| lake |" in (tmp_path / "e" / "per_class_iou.md").read_text()
    predict(compose([f"ckpt={run}", f"input={root / 'images'}", f"output={tmp_path / 'p'}",
                     f"paths.output_dir={tmp_path / 'p'}"], config_name="predict"))
    mask = Image.open(tmp_path / "p" / "scene_001.png")
    assert mask.mode == "P" and mask.getpalette()[:6] == [20, 120, 20, 30, 60, 220]  # the dataset's colours
    assert set(np.unique(np.asarray(mask))) <= {0, 1}  # pixel values are class indices
    build_report(str(run), tmp_path / "r", {}, num_images=1, gallery=2)
    assert "| run | land | lake |" in (tmp_path / "r" / "results.md").read_text()
    assert "iou_land,iou_lake" in (tmp_path / "r" / "results.csv").read_text()
    exported = export_model(compose([f"ckpt={run}", "format=torchscript", f"output={tmp_path / 'x' / 'model.pt'}"],
                                    config_name="export"))
    from segvoc.deploy.exported import read_metadata

    meta = read_metadata(exported)
    assert meta["class_names"] == ["land", "lake"] and meta["colors"] == [[20, 120, 20], [30, 60, 220]]
    assert all(_no_voc_name_in(folder) > 0 for folder in (run, tmp_path / "e", tmp_path / "r"))


def test_predict_masks_give_evaluate_s_scores(two_class_run, tmp_path):
    """numpy's confusion matrix over predict's masks of the test images equals the one evaluate scored."""
    from segvoc.evaluate import evaluate
    from segvoc.predict import predict

    root, run = two_class_run
    ids = (run / "splits" / "test.txt").read_text().split()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in ids:
        source = next((root / "images").glob(f"{i}.*"))
        shutil.copy(source, inputs / source.name)
    predict(compose([f"ckpt={run}", f"input={inputs}", f"output={tmp_path / 'p'}",
                     f"paths.output_dir={tmp_path / 'p'}"], config_name="predict"))
    matrix = np.zeros((2, 2), np.int64)
    for i in ids:
        truth = np.asarray(Image.open(root / "masks" / f"{i}.png"))
        pred = np.asarray(Image.open(tmp_path / "p" / f"{i}.png"))
        keep = truth != 255
        matrix += np.bincount(2 * truth[keep].astype(np.int64) + pred[keep], minlength=4).reshape(2, 2)
    evaluate(compose([f"ckpt={run}", f"paths.output_dir={tmp_path / 'e'}"], config_name="evaluate"))
    assert json.loads((tmp_path / "e" / "confusion.json").read_text())["test"] == matrix.tolist()


@pytest.mark.slow
def test_a_five_class_folder_dataset_end_to_end_on_the_command_line(tmp_path):
    """check -> a 2-seed sweep -> evaluate -> predict -> report, through the commands a user types; the class names
    appear in each output and no VOC name in any."""
    root = make_folder_dataset(tmp_path / "data", NAMES, n=18)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, (args, r.stderr[-3000:])
        return r

    checked = run("segvoc.data.check", "data=folder", f"data.root={root}", f"hydra.run.dir={tmp_path / 'check'}")
    assert "| buoy |" in checked.stdout and "no errors found" in checked.stdout
    sweep = tmp_path / "sweep"
    run("segvoc.train", "-m", "seed=1,2", "data=folder", f"data.root={root}", "debug=smoke", "data.image_size=32",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}",
        f"paths.output_root={tmp_path / 'out'}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_fcn_baseline_data.image_size-32__seed-1__trainer.max_epochs-1",
                                      "1_fcn_baseline_data.image_size-32__seed-2__trainer.max_epochs-1"]
    evaluated = run("segvoc.evaluate", f"ckpt={jobs[0]}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert "| dock |" in evaluated.stdout
    run("segvoc.predict", f"ckpt={jobs[0]}", f"input={root / 'images'}", f"output={tmp_path / 'pred'}",
        f"hydra.run.dir={tmp_path / 'pred'}")
    run("segvoc.report", f"sweep={sweep}", f"hydra.run.dir={tmp_path / 'report'}")
    assert "| group | n | seeds |" in (tmp_path / "report" / "results.md").read_text()
    assert all(f"| {n}" in (tmp_path / "report" / "results.md").read_text() for n in NAMES)
    assert all(_no_voc_name_in(folder) > 0 for folder in (sweep, tmp_path / "eval", tmp_path / "report"))


@pytest.mark.slow
def test_the_real_voc_pairs_as_a_three_class_folder_dataset(voc_mini, tmp_path):
    """The four real VOC pairs re-laid as a folder dataset of 3 classes: background stays background, aeroplane
    stays aeroplane, the other 19 VOC classes become "other" (255 stays not labelled). It checks clean and trains,
    and its outputs name those three classes."""
    from segvoc.train import train
    from tests.conftest import make_cfg

    root = tmp_path / "mini3"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for path in sorted((voc_mini / "SegmentationClass").glob("*.png")):
        mask = np.asarray(Image.open(path))
        mapped = np.where(mask == 255, 255, np.where(mask == 0, 0, np.where(mask == 1, 1, 2))).astype(np.uint8)
        Image.fromarray(mapped, mode="L").save(root / "masks" / path.name)
        shutil.copy(voc_mini / "JPEGImages" / f"{path.stem}.jpg", root / "images" / f"{path.stem}.jpg")
    (root / "classes.yaml").write_text("names: [background, aeroplane, other]\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "splits" / "val.txt").write_text("2007_000033\n")
    (root / "splits" / "test.txt").write_text("2007_000042\n")
    report = check_dataset(_data(root), progress=False)
    assert report["errors"] == [] and report["classes"] == ["background", "aeroplane", "other"]
    assert all(report["counts"]) and report["splits"] == {"train": 2, "val": 1, "test": 1}
    metrics = train(make_cfg(tmp_path / "run", "data=folder", "debug=smoke", "data.image_size=64",
                             "trainer.max_epochs=1", data_root=root))
    assert metrics["test"]["classes"] == ["background", "aeroplane", "other"]
    assert len(metrics["test"]["per_class_iou"]) == 3
