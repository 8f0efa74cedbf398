"""Every kind of bad input gets one clear line; predict survives odd images; the tree checker reports all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segvoc.config import REPO_ROOT
from segvoc.data.tree_check import check_tree
from segvoc.data.voc import make_splits
from segvoc.errors import DatasetError


def _copy(voc_mini: Path, tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc_mini, root)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_split_file_missing_or_empty(voc_mini, tmp_path):
    root = _copy(voc_mini, tmp_path)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"val.txt: split list is empty"):
        make_splits(root)
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"val.txt: split list is missing"):
        make_splits(root)
    with pytest.raises(DatasetError, match=r"SegmentationClassAug is missing"):
        (root / "ImageSets/Segmentation/train_aug.txt").write_text("2007_000032\n")
        (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n")
        make_splits(root, train_split="train_aug")


def test_checker_lists_every_bad_pair(voc_mini, tmp_path):
    root = _copy(voc_mini, tmp_path)
    jpg = root / "JPEGImages" / "2007_000039.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])  # truncated JPEG
    (root / "SegmentationClass" / "2007_000033.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt PNG
    report = check_tree(tmp_path, progress=False)
    assert report["splits"] == {"train": 2, "val": 1, "test": 1}
    joined = "\n".join(report["problems"])
    assert len(report["problems"]) == 2 and "2007_000039.jpg" in joined and "2007_000033.png" in joined
    assert report["counts"][0] > 0 and report["counts"][1] > 0  # the good pairs were still counted


@pytest.mark.slow
def test_checker_cli_exit_codes(voc_mini, tmp_path):
    ok = _cli("segvoc.data.check", f"data.root={voc_mini}", f"paths.output_root={tmp_path}")
    assert ok.returncode == 0 and "no problems found" in ok.stdout and "train 2" in ok.stdout
    root = _copy(voc_mini, tmp_path / "bad")
    mask = np.array(Image.open(root / "SegmentationClass" / "2007_000042.png"))
    mask[0, 0] = 77
    Image.fromarray(mask).save(root / "SegmentationClass" / "2007_000042.png")
    bad = _cli("segvoc.data.check", f"data.root={tmp_path / 'bad'}", f"paths.output_root={tmp_path}")
    assert bad.returncode == 2 and "values [77]" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_unknown_names_and_keys_name_the_choices(tmp_path):
    r = _cli("segvoc.train", "model=resnet99", f"paths.output_root={tmp_path}")
    assert r.returncode != 0 and "model/resnet99" in r.stderr and "fcn_baseline" in r.stderr
    r = _cli("segvoc.train", "experiment=6z", f"paths.output_root={tmp_path}")
    assert r.returncode != 0 and "5b_transfer" in r.stderr
    r = _cli("segvoc.train", "trainer.max_epoch=3", f"paths.output_root={tmp_path}")
    assert r.returncode != 0 and "max_epoch" in r.stderr


@pytest.mark.slow
def test_missing_weights_cli_is_one_line(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "model=resnet34_transfer", f"model.weights={tmp_path}/nope.pth", "data=synthetic",
             "data.synthetic=null", f"data.root={synthetic_root}", "debug=smoke", f"paths.output_root={tmp_path}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope.pth: weights file not found" in last and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, synthetic_root) -> Path:
    from segvoc.train import train
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("run")
    train(make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=2",
                   "trainer.max_epochs=1", data_root=synthetic_root))
    return out / "checkpoints" / "best.ckpt"


def test_predict_survives_odd_inputs(tiny_ckpt, tmp_path):
    from segvoc.config import compose
    from segvoc.predict import predict

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (45, 61), dtype=np.uint16)).save(src / "deep16.png")
    exif_img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    exif_img.save(src / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(src / "huge.jpg", quality=50)
    (src / "unreadable.png").write_bytes(b"\x89PNG broken")
    cfg = compose([f"ckpt={tiny_ckpt}", f"input={src}", f"output={tmp_path / 'out'}", f"paths.output_dir={tmp_path}",
                   "max_side=1024"], config_name="predict")
    result = predict(cfg)
    assert len(result["done"]) == 3 and len(result["failed"]) == 1
    sizes = {p: Image.open(tmp_path / "out" / f"{p}.png").size for p in ("deep16", "rotated", "huge")}
    assert sizes == {"deep16": (61, 45), "rotated": (30, 50), "huge": (4000, 3000)}  # EXIF-rotated: 30 wide


@pytest.mark.slow
def test_predict_nothing_readable_is_an_error(tiny_ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"nope")
    r = _cli("segvoc.predict", f"ckpt={tiny_ckpt}", f"input={src}", f"output={tmp_path / 'o'}",
             f"paths.output_root={tmp_path}")
    assert r.returncode == 2 and "no image could be processed" in r.stderr and "a.jpg" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_bad_image_inside_a_loader_worker_is_one_line(voc_mini, tmp_path, split):
    """With loader workers, a corrupt JPEG gives the same one line (and exit 2) as without: PyTorch re-raises
    the worker's error wrapped in 'Caught ... in DataLoader worker process N' plus a traceback."""
    root = _copy(voc_mini, tmp_path / "data")
    splits = make_splits(root)
    victim = root / "JPEGImages" / f"{splits[split][0]}.jpg"
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    args = [f"data.root={tmp_path / 'data'}", "data.num_workers=2", "data.batch_size=2", "data.image_size=64",
            "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            f"paths.output_root={tmp_path / 'out'}"]
    r = _cli("segvoc.train", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {victim}: ") and "Caught" not in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]


@pytest.mark.slow
def test_traceback_true_shows_the_traceback(tmp_path):
    r = _cli("segvoc.train", f"data.root={tmp_path}/nope", "traceback=true", f"paths.output_root={tmp_path}/o")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "segvoc.errors.DatasetError: VOC 2012 not found" in r.stderr
