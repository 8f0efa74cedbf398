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
from segvoc.data.tree_check import check_dataset
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
    report = check_dataset({"root": tmp_path}, progress=False)
    assert report["splits"] == {"train": 2, "val": 1, "test": 1}
    joined = "\n".join(report["errors"])
    assert len(report["errors"]) == 2 and "2007_000039.jpg" in joined and "2007_000033.png" in joined
    assert report["counts"][0] > 0 and report["counts"][1] > 0  # the good pairs were still counted


@pytest.mark.slow
def test_checker_cli_exit_codes(voc_mini, tmp_path):
    ok = _cli("segvoc.data.check", f"data.root={voc_mini}", f"paths.output_root={tmp_path}")
    assert ok.returncode == 0 and "no errors found" in ok.stdout and "train 2" in ok.stdout
    root = _copy(voc_mini, tmp_path / "bad")
    mask = np.array(Image.open(root / "SegmentationClass" / "2007_000042.png"))
    mask[0, 0] = 77
    Image.fromarray(mask).save(root / "SegmentationClass" / "2007_000042.png")
    bad = _cli("segvoc.data.check", f"data.root={tmp_path / 'bad'}", f"paths.output_root={tmp_path}")
    assert bad.returncode == 2 and "values 77 (1 px)" in bad.stdout
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


def _predict(ckpt: Path, src: Path, out: Path, *extra: str) -> dict:
    from segvoc.config import compose
    from segvoc.predict import predict

    return predict(compose([f"ckpt={ckpt}", f"input={src}", f"output={out}", f"paths.output_dir={out.parent}",
                            *extra], config_name="predict"))


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_keeps_going_past_an_extreme_aspect_ratio(tiny_ckpt, tmp_path):
    """A 100000 x 10 image (shrunk to max_side, its short side rounded to 0: a cv2.resize error that stopped the
    whole folder) gets a mask of its own size, and the next input is predicted too."""
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a_long.png", 10, 100000)
    _image(src / "b.jpg", 30, 40)
    result = _predict(tiny_ckpt, src, tmp_path / "out")
    assert result["failed"] == [] and len(result["done"]) == 2
    assert Image.open(tmp_path / "out" / "a_long.png").size == (100000, 10)
    assert Image.open(tmp_path / "out" / "b.png").size == (40, 30)


def test_predict_refuses_inputs_that_would_write_the_same_files(tiny_ckpt, tmp_path):
    """a.jpg and a.png both made a.png (the second replaced the first): each is refused in one line naming the
    other, and the rest of the folder is predicted."""
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.jpg", 20, 30)
    _image(src / "a.png", 20, 30, seed=1)
    _image(src / "b.jpg", 20, 30)
    result = _predict(tiny_ckpt, src, tmp_path / "out")
    assert result["done"] == [str(src / "b.jpg")]
    assert result["failed"] == [f"{src / 'a.jpg'}: a.png would write the same a.png; rename one of them or predict "
                                "them into different folders",
                                f"{src / 'a.png'}: a.jpg would write the same a.png; rename one of them or predict "
                                "them into different folders"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "b_overlay.png"]


def test_predict_into_the_input_folder_never_overwrites_an_input(tiny_ckpt, tmp_path):
    """output= the input folder: an input whose mask or overlay would replace an input file (itself included) is
    refused in one line before anything is written; the others are predicted beside their inputs."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg", "c_overlay.png"):
        _image(src / name, 20, 30)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    result = _predict(tiny_ckpt, src, src)
    assert result["done"] == [str(src / "a.jpg")]
    reasons = dict(line.split(": ", 1) for line in result["failed"])
    assert reasons == {str(src / "b.png"): f"its output {src / 'b.png'} would overwrite itself; set output= to "
                                           "another folder",
                       str(src / "c.jpg"): f"its output {src / 'c_overlay.png'} would overwrite the input "
                                           "c_overlay.png; set output= to another folder",
                       str(src / "c_overlay.png"): f"its output {src / 'c_overlay.png'} would overwrite itself; set "
                                                   "output= to another folder"}
    assert {name: (src / name).read_bytes() for name in before} == before
    assert (src / "a.png").is_file() and (src / "a_overlay.png").is_file()


def test_predict_writes_each_output_atomically(tiny_ckpt, tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves the earlier mask as it was and no partial or temporary
    file; the input is reported in one line and the next one is predicted."""
    import io

    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.jpg", 20, 30)
    _image(src / "b.jpg", 20, 30)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier mask")
    real_save = Image.Image.save

    def save_half(self, fp, format=None, **params):
        if self.mode == "P" and self.width == 30 and not hasattr(save_half, "done"):  # a.jpg's mask, once
            save_half.done = True
            buf = io.BytesIO()
            real_save(self, buf, format="PNG")
            data = buf.getvalue()[: len(buf.getvalue()) // 2]
            if isinstance(fp, str | Path):
                Path(fp).write_bytes(data)
            else:
                fp.write(data)
            raise OSError(28, "No space left on device")
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", save_half)
    result = _predict(tiny_ckpt, src, out)
    assert result["done"] == [str(src / "b.jpg")]
    assert result["failed"] == [f"{src / 'a.jpg'}: failed (OSError: [Errno 28] No space left on device)"]
    assert (out / "a.png").read_bytes() == b"an earlier mask"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "b_overlay.png"]


def test_predict_traceback_true_lets_an_unexpected_error_through(tiny_ckpt, tmp_path, monkeypatch):
    """traceback=true: an error that is not a user error stops predict with its traceback, for whoever debugs it."""
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.jpg", 20, 30)

    def broken_save(self, fp, format=None, **params):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        _predict(tiny_ckpt, src, tmp_path / "out", "traceback=true")


@pytest.mark.slow
def test_predict_cli_skips_a_bad_input_sums_up_and_exits_2(tiny_ckpt, tmp_path):
    """One bad input among good ones: one line for it, the good masks written, a summary at the end, exit 2."""
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.jpg", 20, 30)
    (src / "b.png").write_bytes(b"\x89PNG broken")
    _image(src / "c.jpg", 20, 30)
    r = _cli("segvoc.predict", f"ckpt={tiny_ckpt}", f"input={src}", f"output={tmp_path / 'o'}",
             f"paths.output_root={tmp_path}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("skipped ")] == \
        [line for line in lines if line.startswith(f"skipped {src / 'b.png'}: cannot read image")]
    assert len([line for line in lines if line.startswith("skipped ")]) == 1
    assert f"predicted 2 of 3 input(s) into {tmp_path / 'o'}; 1 failed:" in lines
    assert lines[-1] == f"error: input={src}: 1 of 3 input(s) failed (listed above); the others were written"
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "a_overlay.png", "c.png", "c_overlay.png"]


def test_deep_images_are_scaled_by_their_type_not_their_values(tmp_path):
    """16-bit: 65535 is white, whatever the image's own maximum (a 12-bit camera's 4095 is dark, not white);
    float: 0-1; a float image outside 0-1 or a 32-bit integer image is refused in one line."""
    from segvoc.data.io import read_rgb

    Image.fromarray(np.array([[0, 257 * 10, 257 * 100]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert read_rgb(tmp_path / "deep.png")[0].tolist() == [[0] * 3, [10] * 3, [100] * 3]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert read_rgb(tmp_path / "float.tif")[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]
    Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(DatasetError, match=r"hdr.tif: float image with values outside 0-1 \(min 0, max 2\)"):
        read_rgb(tmp_path / "hdr.tif")
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(DatasetError, match=r"int32.tif: 32-bit integer image has no known range"):
        read_rgb(tmp_path / "int32.tif")


def test_a_worker_side_data_error_is_one_line_whatever_carries_it(tmp_path, monkeypatch, capsys):
    """Item 13: under load a corrupt image read by a loader worker could end as Hydra's "HYDRA_FULL_ERROR" exit 1.
    Each way the worker's ``DatasetError`` can reach the entry point is forced here; each gives the one line and
    exit code 2: torch could not rebuild the error's type (only its text carries it), a second error raised *from*
    another while the worker's was being handled (shutting the workers down), and OpenCV raising instead of
    returning None for a corrupt stream."""
    import cv2
    from omegaconf import OmegaConf

    from segvoc.app import run_app
    from segvoc.data.io import load_image
    from segvoc.errors import DatasetError

    original = f"{tmp_path}/a.jpg: cannot decode image (corrupt or not an image); re-extract or replace it"
    text = ("Caught DatasetError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "segvoc/data/voc.py", line 1, in load\n'
            f"segvoc.errors.DatasetError: {original}\n")

    def rebuilt_as_runtime_error(cfg):
        raise RuntimeError(text) from None

    def raised_from_another(cfg):
        try:
            raise DatasetError(original)
        except DatasetError:
            raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly") from OSError("broken pipe")

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9")
    monkeypatch.setattr(cv2, "imdecode", lambda *a: (_ for _ in ()).throw(cv2.error("corrupt stream")))

    def cv2_raises(cfg):
        load_image(tmp_path / "a.jpg")

    for fn in (rebuilt_as_runtime_error, raised_from_another, cv2_raises):
        with pytest.raises(SystemExit) as exc:
            run_app(fn, OmegaConf.create({}))
        assert exc.value.code == 2, fn.__name__
        assert capsys.readouterr().err.strip() == f"error: {original}", fn.__name__
