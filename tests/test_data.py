"""Loading real VOC pairs, splits, augmentation alignment, and clear errors for bad trees."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from PIL import Image

from segvoc.config import compose
from segvoc.data.io import load_image, load_mask
from segvoc.data.palette import VOC_COLORMAP, colorize, rgb_to_index
from segvoc.data.transforms import build_pipeline, pad_collate
from segvoc.data.voc import VOCPairs, make_splits, resolve_voc_root
from segvoc.engine.builders import build_datamodule
from segvoc.errors import DatasetError

EXPECTED = {"2007_000032": {0, 1, 15, 255}, "2007_000039": {0, 20, 255}, "2007_000033": {0, 1, 255},
            "2007_000042": {0, 19, 255}}


def test_real_pairs_load_and_decode(voc_mini):
    ds = VOCPairs(voc_mini, sorted(EXPECTED))
    for k, i in enumerate(ds.ids):
        image, mask = ds.load(k)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) == EXPECTED[i]
        with Image.open(voc_mini / "JPEGImages" / f"{i}.jpg") as im:
            assert im.size == (image.shape[1], image.shape[0])
    item = ds[0]
    assert item["image"].shape[0] == 3 and item["mask"].shape == item["image"].shape[1:]


def test_palette_round_trip(voc_mini):
    mask = load_mask(voc_mini / "SegmentationClass" / "2007_000032.png")
    assert np.array_equal(rgb_to_index(colorize(mask)), mask)
    assert tuple(VOC_COLORMAP[1]) == (128, 0, 0) and tuple(VOC_COLORMAP[255]) == (224, 224, 192)


def test_rgb_mask_is_converted_or_rejected(tmp_path, voc_mini):
    mask = load_mask(voc_mini / "SegmentationClass" / "2007_000032.png")
    Image.fromarray(colorize(mask)).save(tmp_path / "rgb.png")
    assert np.array_equal(load_mask(tmp_path / "rgb.png"), mask)
    bad = colorize(mask)
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match="colours outside the 21 class colours"):
        load_mask(tmp_path / "bad.png")


def test_root_can_be_any_level(voc_mini):
    for root in (voc_mini, voc_mini.parent, voc_mini.parent.parent):
        assert resolve_voc_root(root) == voc_mini


def test_splits_are_seeded_halves_of_val(voc_mini):
    s = make_splits(voc_mini, test_fraction=0.5, split_seed=0)
    assert s["train"] == ["2007_000032", "2007_000039"]
    assert sorted(s["val"] + s["test"]) == ["2007_000033", "2007_000042"] and len(s["test"]) == 1
    assert make_splits(voc_mini, test_fraction=0.5, split_seed=0) == s


def test_datamodule_writes_splits_and_never_pads_eval_batches(voc_mini, tmp_path):
    cfg = compose([f"paths.output_dir={tmp_path}", "data=voc_mini", f"data.root={voc_mini}", "data.eval_batch_size=2",
                   "data.test_fraction=0"])
    dm = build_datamodule(cfg, split_dir=tmp_path / "splits")
    dm.setup("fit")
    assert (tmp_path / "splits" / "val.txt").read_text().split() == ["2007_000033", "2007_000042"]
    batches = list(dm.val_dataloader())  # two sizes: two batches at full resolution, nothing padded
    assert [tuple(b["image"].shape) for b in batches] == [(1, 3, 366, 500), (1, 3, 335, 500)]
    assert [b["id"] for b in batches] == [["2007_000033"], ["2007_000042"]]
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape[-2:] == (384, 512)  # augment=none: native scale, padded to multiples of 32


def test_augmentation_keeps_alignment_and_invents_no_labels():
    # each class region is painted in that class's own colour, so alignment can be checked pixel by pixel
    mask = np.zeros((120, 160), np.uint8)
    mask[20:70, 30:90] = 7
    mask[60:110, 100:150] = 15
    mask[65:68, :] = 255
    image = np.ascontiguousarray(VOC_COLORMAP[mask])
    cfg = compose(["paths.output_dir=/tmp", "augment=report", "data.image_size=96"])
    pipe = build_pipeline(cfg.augment.train)
    for _ in range(30):
        out = pipe(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape[:2] == m.shape == (96, 96)
        assert set(np.unique(m).tolist()) <= {0, 7, 15, 255}
        for c in (7, 15):
            inside = (m == c)
            if inside.sum() > 50:  # interior pixels carry exactly the class colour
                interior = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8), borderType=cv2.BORDER_CONSTANT,
                                     borderValue=0).astype(bool)
                if interior.sum() > 20:
                    diff = np.abs(img[interior].astype(int) - VOC_COLORMAP[c]).max(1)
                    assert (diff <= 2).mean() > 0.99


@pytest.mark.parametrize(("h", "w", "size"), [(375, 500, 320), (500, 333, 320), (60, 80, 64), (60, 80, 96)])
def test_no_augmentation_keeps_the_native_scale(h, w, size):
    """augment=none trains at the scale val/test are scored at: the image is only padded (0, mask 255), never
    resized, to at least data.image_size and to a multiple of 32."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
    cfg = compose(["paths.output_dir=/tmp", "augment=none", f"data.image_size={size}"])
    out = build_pipeline(cfg.augment.train)(image=image, mask=mask)
    img, m = out["image"], out["mask"]
    assert img.shape[0] >= max(h, size) and img.shape[1] >= max(w, size)
    assert img.shape[0] % 32 == 0 and img.shape[1] % 32 == 0
    assert np.array_equal(img[:h, :w], image) and np.array_equal(m[:h, :w], mask)
    assert (m[h:] == 255).all() and (m[:, w:] == 255).all() and (img[h:] == 0).all()


def test_flip_is_applied_to_both():
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2] = 255
    mask = np.zeros((4, 6), np.uint8)
    mask[:, :2] = 3
    out = A.Compose([A.HorizontalFlip(p=1)])(image=image, mask=mask)
    assert (out["mask"][:, -2:] == 3).all() and (out["image"][:, -2:] == 255).all()


def test_pad_collate_uses_255_for_masks():
    import torch

    a = {"image": torch.ones(3, 2, 3, dtype=torch.uint8), "mask": torch.zeros(2, 3, dtype=torch.uint8), "id": "a"}
    b = {"image": torch.ones(3, 4, 2, dtype=torch.uint8), "mask": torch.ones(4, 2, dtype=torch.uint8), "id": "b"}
    batch = pad_collate([a, b])
    assert batch["image"].shape == (2, 3, 4, 3) and batch["id"] == ["a", "b"]
    assert (batch["mask"][0, 2:] == 255).all() and (batch["mask"][1, :, 2] == 255).all()
    assert (batch["image"][0, :, 2:] == 0).all()


def test_synthetic_tree_is_deterministic_and_valid(tmp_path):
    from segvoc.data.synthetic import generate

    v1 = generate(tmp_path / "a", num_train=4, num_val=2, height=40, width=50, seed=3)
    v2 = generate(tmp_path / "b", num_train=4, num_val=2, height=40, width=50, seed=3)
    for f in ("JPEGImages/syn_train_00002.jpg", "SegmentationClass/syn_val_00001.png"):
        assert (v1 / f).read_bytes() == (v2 / f).read_bytes()
    labels = set()
    for i in range(4):
        m = load_mask(v1 / "SegmentationClass" / f"syn_train_{i:05d}.png")
        assert load_image(v1 / "JPEGImages" / f"syn_train_{i:05d}.jpg").shape[:2] == m.shape
        labels |= set(np.unique(m).tolist())
    assert 0 in labels and 255 in labels and len(labels - {0, 255}) >= 1


def test_missing_root_is_one_clear_line(tmp_path):
    with pytest.raises(DatasetError) as err:
        resolve_voc_root(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "data.root" in msg and "data.download=true" in msg and "\n" not in msg


def test_half_extracted_tree_names_missing_folder(tmp_path, voc_mini):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc_mini, root)
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(DatasetError, match="SegmentationClass"):
        resolve_voc_root(tmp_path)


def test_split_listing_missing_ids(tmp_path, voc_mini):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_mini, root)
    with open(root / "ImageSets/Segmentation/train.txt", "a") as f:
        f.write("2099_000001\n2099_000002\n")
    with pytest.raises(DatasetError, match=r"2 of 4 ids .*2099_000001"):
        make_splits(root)


def test_mask_with_bad_labels(tmp_path):
    from segvoc.data.io import save_palette_mask

    save_palette_mask(np.full((3, 3), 42, np.uint8), tmp_path / "m.png")
    with pytest.raises(DatasetError, match=r"values 42 \(9 px\) outside 0-20"):
        load_mask(tmp_path / "m.png")


def test_size_mismatch(tmp_path, voc_mini):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_mini, root)
    m = Image.open(root / "SegmentationClass/2007_000032.png")
    m.crop((0, 0, 100, 100)).save(root / "SegmentationClass/2007_000032.png")
    with pytest.raises(DatasetError, match="same size"):
        VOCPairs(root, ["2007_000032"])[0]


def test_corrupt_and_truncated_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot decode"):
        load_image(tmp_path / "x.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated|cannot decode"):
        load_image(tmp_path / "t.jpg")


def test_path_objects(voc_mini):
    assert isinstance(resolve_voc_root(str(voc_mini)), Path)


def test_auto_loader_settings(monkeypatch):
    import os

    from segvoc.data.datamodule import resolve_loader_settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_loader_settings("auto", False) == (8, False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_loader_settings("auto", "auto", "cpu") == (2, False)
    assert resolve_loader_settings(3, True, "cpu") == (3, True)


def test_loader_workers_start_after_opencv_used_threads_in_the_main_process(synthetic_root):
    """OpenCV's thread pool, once running in the main process (predict, report), must not be inherited by forked
    loader workers: a worker touching it would hang. Run in a subprocess with a timeout."""
    import subprocess
    import sys

    from segvoc.config import REPO_ROOT

    code = f"""
import cv2, numpy as np
cv2.setNumThreads(4)
for _ in range(3):
    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1000, 1000))  # starts OpenCV's pool in this process
from segvoc.engine.builders import build_datamodule
from segvoc.config import compose
cfg = compose(["paths.output_dir=/tmp/x", "data=synthetic", "data.synthetic=null", "data.root={synthetic_root}",
               "augment=report", "data.num_workers=2", "data.image_size=48"])
dm = build_datamodule(cfg)
dm.setup("fit")
batch = next(iter(dm.train_dataloader()))
print("ok", tuple(batch["image"].shape))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_size_grouped_batches_cover_each_shard_once_with_one_size_per_batch():
    from segvoc.data.sampling import SizeGroupedBatches

    sizes = [(5, 7), (7, 5), (5, 7), (9, 9), (5, 7), (7, 5), (5, 7), (5, 7), (9, 9), (7, 5), (5, 7)]
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            batches = list(SizeGroupedBatches(sizes, 3, rank, world))
            assert all(len(b) <= 3 and len({sizes[i] for i in b}) == 1 for b in batches)
            assert sorted(i for b in batches for i in b) == list(range(rank, len(sizes), world))
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(len(sizes)))  # every image exactly once over the ranks
    assert list(SizeGroupedBatches(sizes, 3)) == [[0, 2, 4], [6, 7, 10], [1, 5, 9], [3, 8]]


def test_eval_batch_size_does_not_change_the_confusion_matrix(tmp_path):
    """Batch 1 and batch 4 over images of mixed odd sizes: the same predictions, so the same confusion matrix."""
    import pytorch_lightning as pl
    import torch

    from segvoc.data.synthetic import generate
    from segvoc.engine.builders import build_task

    root = tmp_path / "mixed"
    generate(root, num_train=4, num_val=14, classes=(1, 7, 8, 12, 15), sizes=[[61, 77], [77, 61], [45, 90]])
    matrices = []
    for batch_size in (1, 4):
        cfg = compose([f"paths.output_dir={tmp_path}", "data=synthetic", f"data.root={root}", "data.synthetic=null",
                       f"data.eval_batch_size={batch_size}", "data.num_workers=0", "data.test_fraction=0"])
        dm = build_datamodule(cfg)
        dm.setup("fit")
        assert len({dm.datasets["val"].sizes()[i] for i in range(14)}) == 3
        torch.manual_seed(0)
        task = build_task(cfg, pretrained=False)
        for m in task.model.modules():  # trained-like BatchNorm statistics, so classes other than one are predicted
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(task, dataloaders=dm.val_dataloader(), verbose=False)
        matrices.append(task.scores["val"]["confusion"])
    assert (matrices[0] == matrices[1]).all()
    assert (matrices[0].sum(0) > 0).sum() >= 2  # more than one class predicted: the comparison means something


def test_decode_cache_gives_the_same_batches_and_follows_file_changes(tmp_path):
    """data.decode_cache=true: the same training batches as decoding JPEGs (same seed, epoch, augmentation), from
    a memory-mapped file that workers read; editing an image makes a new cache."""
    import torch

    from segvoc.data.synthetic import generate

    root = tmp_path / "mixed"
    generate(root, num_train=6, num_val=2, sizes=[[61, 77], [77, 61]])
    batches = {}
    for cached in (False, True):
        cfg = compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "data=synthetic",
                       f"data.root={root}", "data.synthetic=null", "augment=report", "data.image_size=48",
                       "data.batch_size=3", "data.num_workers=2", f"data.decode_cache={str(cached).lower()}"])
        dm = build_datamodule(cfg)
        dm.setup("fit")
        assert (dm.datasets["train"].decoded is not None) == cached
        batches[cached] = list(dm.train_dataloader())
    for a, b in zip(batches[False], batches[True], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(list((tmp_path / "cache" / "decoded").glob("decoded_*.u8"))) == 1
    image = next((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("syn_train_*.jpg"))
    image.write_bytes(image.read_bytes())  # a new mtime: the cache key changes
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert len(list((tmp_path / "cache" / "decoded").glob("decoded_*.u8"))) == 2


def _decode_cache_cfg(tmp_path: Path, root: Path, workers: int = 2):
    return compose([f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "data=synthetic",
                    f"data.root={root}", "data.synthetic=null", "augment=report", "data.image_size=48",
                    "data.batch_size=3", f"data.num_workers={workers}", "data.decode_cache=true"])


def test_decode_cache_rebuilds_a_truncated_data_file_before_workers_read_it(tmp_path):
    """A cache whose data file was cut short (a full disk, a killed copy) is built again, not read by the loader
    workers (which failed on every batch that reached past the cut: its index alone counted as valid)."""
    import torch

    from segvoc.data.synthetic import generate

    root = tmp_path / "mixed"
    generate(root, num_train=6, num_val=2, sizes=[[61, 77], [77, 61]])
    cfg = _decode_cache_cfg(tmp_path, root)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    expected = list(dm.train_dataloader())
    (data,) = (tmp_path / "cache" / "decoded").glob("decoded_*.u8")
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    got = list(dm.train_dataloader())  # two loader workers read the cache
    assert data.stat().st_size == size
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def _same_size_jpeg(image: np.ndarray, size: int) -> bytes:
    """``image`` as a JPEG of exactly ``size`` bytes: encoded small enough, then padded with a comment segment."""
    for quality in range(95, 0, -5):
        data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
        data = data.tobytes()
        if len(data) + 4 <= size:
            pad = size - len(data) - 4
            return data[:2] + b"\xff\xfe" + (pad + 2).to_bytes(2, "big") + b"c" * pad + data[2:]
    raise AssertionError("cannot encode the image small enough")


def test_decode_cache_sees_a_file_replaced_with_the_same_size_and_mtime(tmp_path):
    """A source image replaced by other pixels of the same byte size, its mtime set back (``cp -p``, ``rsync -t``,
    ``os.utime``), is decoded again: the cache never serves the old pixels."""
    from segvoc.data.synthetic import generate

    root = tmp_path / "syn"
    generate(root, num_train=4, num_val=2, height=40, width=56)
    cfg = _decode_cache_cfg(tmp_path, root, workers=0)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    old, _ = dm.datasets["train"].load(0)
    path = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{dm.datasets['train'].ids[0]}.jpg"
    st = path.stat()
    path.write_bytes(_same_size_jpeg(255 - old, st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    new, _ = dm.datasets["train"].load(0)
    assert np.array_equal(new, load_image(path)) and not np.array_equal(new, old)


def test_decode_cache_is_rebuilt_by_a_lab_mate_despite_my_lock_file(tmp_path):
    """A shared ``paths.cache_dir`` where one user's build left its lock file (0644) behind: another user, who
    cannot write that file (not root: it is made read-only), builds the cache; the lock opened with mode "w" was
    a PermissionError with a traceback."""
    import shutil

    from segvoc.data.synthetic import generate
    from segvoc.data.voc import VOCPairs
    from tests.helpers import lab_mate, shared_folder

    folder = shared_folder()
    try:
        voc = generate(folder / "syn", num_train=3, num_val=1, height=30, width=40)
        ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        cache = folder / "cache"
        cache.mkdir(mode=0o777)
        cache.chmod(0o777)  # a group-shared cache folder: everyone may add files
        VOCPairs(voc, ids).use_decode_cache(cache)
        (data,) = cache.glob("decoded_*.u8")
        (lock,) = cache.glob("decoded_*.lock")
        data.with_suffix(".json").unlink()  # as if the build had died before its index: only the lock is left
        data.unlink()
        if os.geteuid() != 0:
            lock.chmod(0o444)
        body = ("ds = VOCPairs(Path(sys.argv[1]), sys.argv[3:])\n"
                "ds.use_decode_cache(Path(sys.argv[2]))\n"
                "image, mask = ds.load(0)\n"
                "assert np.array_equal(image, load_image(Path(sys.argv[1]) / 'JPEGImages' / f'{ds.ids[0]}.jpg'))\n"
                "print('rebuilt')")
        proc = lab_mate("from pathlib import Path; import numpy as np; from segvoc.data.voc import VOCPairs\n"
                        "from segvoc.data.io import load_image", body, str(voc), str(cache), *ids)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "rebuilt", err[-2000:]
        assert data.stat().st_size == 30 * 40 * 4 * len(ids)
    finally:
        shutil.rmtree(folder)


def test_pipeline_steps_draw_independent_parameters(tmp_path):
    """``VOCPairs`` seeds its pipeline as one stream (``seed_pipeline``): flips, rotations and scales are
    independent. With a generator per step seeded alike (``Compose.set_random_seed``, before) every step's first
    draw was the same number: a flip, a rotation and a scale below 1 always came together."""
    pipeline = build_pipeline(compose(["augment=report", "paths.output_dir=/tmp/unused",
                                        "data.image_size=48"]).augment.train)
    pipeline.save_applied_params = True
    applied = []

    class Recording:
        def __getattr__(self, name):  # set_random_state / set_random_seed reach the pipeline
            return getattr(pipeline, name)

        def __call__(self, **data):
            out = pipeline(**data)
            applied.append(dict(out["applied_transforms"]))
            return out

    pairs = VOCPairs(tmp_path, [f"id{k}" for k in range(300)], transform=Recording(), seed=0)
    pairs.load = lambda index: (np.zeros((60, 80, 3), np.uint8), np.zeros((60, 80), np.uint8))
    for index in range(300):
        pairs[(1, index)]
    flip, rot, small = np.array([("HorizontalFlip" in a, "Rotate" in a, a["RandomScale"]["scale"] < 1)
                                 for a in applied]).T
    assert 0.35 < np.mean(flip == rot) < 0.65 and 0.35 < np.mean(flip == small) < 0.65
