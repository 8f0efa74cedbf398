"""``data.device_augment``: the report augmentation drawn by the workers, run on the device (here the CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from segvoc.config import compose
from segvoc.data.device_augment import DeviceAugment, augment_batch, rotate, rotation_matrix
from segvoc.data.transforms import build_pipeline, pad_collate, seed_pipeline
from segvoc.engine.builders import build_datamodule
from segvoc.errors import ConfigError


def _report(size: int = 48):
    return compose(["augment=report", "paths.output_dir=/tmp/unused", f"data.image_size={size}"]).augment.train


def _pattern(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A blocky 5-class mask and a smooth image (so interpolation differences stay small)."""
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy // 10 + xx // 13) % 5).astype(np.uint8)
    image = np.stack([(yy * 2) % 256, (xx * 3) % 256, ((yy + xx) * 2) % 256], -1).astype(np.uint8)
    return image, mask


def _device(image: np.ndarray, mask: np.ndarray, plan) -> tuple[np.ndarray, np.ndarray]:
    batch = pad_collate([{"image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
                          "mask": torch.from_numpy(mask), "id": "x", "augment": plan}])
    out = augment_batch(batch)
    return out["image"][0].permute(1, 2, 0).numpy(), out["mask"][0].numpy()


def test_rotation_is_torchvisions_bit_for_bit():
    """The device rotation (matrix brought with the batch) equals ``F.rotate`` for images (bilinear, fill 0) and
    masks (nearest, fill 255), on odd sizes and both directions."""
    g = torch.Generator().manual_seed(0)
    for h, w in ((37, 53), (51, 40)):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        mask = torch.randint(0, 21, (1, h, w), dtype=torch.uint8, generator=g)
        for angle in (-9.7, -0.3, 4.2):
            row = torch.tensor([*rotation_matrix(angle), 0.5 * w, 0.5 * h], dtype=torch.float32)
            assert torch.equal(rotate(image, row, "bilinear", 0.0),
                               F.rotate(image, angle, InterpolationMode.BILINEAR, fill=0))
            assert torch.equal(rotate(mask, row, "nearest", 255.0),
                               F.rotate(mask, angle, InterpolationMode.NEAREST, fill=255))


def test_plans_replay_the_albumentations_pipeline_up_to_interpolation():
    """Same seed, same parameters as the albumentations pipeline (one stream, in its order): the masks agree
    except where nearest sampling rounds a boundary pixel the other way; the images differ by interpolation."""
    steps = _report()
    pipeline, device = build_pipeline(steps), DeviceAugment.from_steps(steps)
    agree, mae = [], []
    for seed in range(40):
        image, mask = _pattern(*((75, 100) if seed % 2 else (100, 75)))
        seed_pipeline(pipeline, seed)
        ref = pipeline(image=image, mask=mask)
        img, m = _device(image, mask, device.draw(seed, *mask.shape))
        assert img.shape == ref["image"].shape and m.shape == ref["mask"].shape
        agree.append((m == ref["mask"]).mean())
        mae.append(np.abs(img.astype(int) - ref["image"].astype(int)).mean())
    assert min(agree) > 0.9 and np.mean(agree) > 0.99, (min(agree), np.mean(agree))
    assert np.mean(mae) < 1.0, np.mean(mae)


def _albumentations_params(seeds: range, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    pipeline = build_pipeline(_report(48))
    pipeline.save_applied_params = True
    image, mask = np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.uint8)
    rows = []
    for seed in seeds:
        seed_pipeline(pipeline, seed)
        applied = dict(pipeline(image=image, mask=mask)["applied_transforms"])
        rot = applied.get("Rotate")
        angle = math.degrees(math.atan2(rot["matrix"][0][1], rot["matrix"][0][0])) if rot else np.nan
        x, y = applied["RandomCrop"]["crop_coords"][:2]
        rows.append(("HorizontalFlip" in applied, applied["RandomScale"]["scale"], angle, y, x))
    return dict(zip(("flip", "scale", "angle", "top", "left"), np.array(rows, float).T, strict=True))


def _device_params(seeds: range, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    device = DeviceAugment.from_steps(_report(48))
    rows = []
    for seed in seeds:
        ops = {op[0]: op for op in device.draw(seed, *shape).ops}
        rot = ops.get("rotate")
        angle = -math.degrees(math.atan2(rot[1][1], rot[1][0])) if rot else np.nan
        rows.append(("hflip" in ops, ops["resize"][1] / shape[0], angle, ops["crop"][1], ops["crop"][2]))
    return dict(zip(("flip", "scale", "angle", "top", "left"), np.array(rows, float).T, strict=True))


def test_parameter_distributions_match_albumentations():
    """Independent draws (other seeds) from both: flip and rotation rates, scale 0.5-1.5, angle -10..10, crop
    offsets agree within sampling error, and the steps are independent of one another in both."""
    shape = (300, 400)
    n = 1500
    ref, dev = _albumentations_params(range(n), shape), _device_params(range(n, 2 * n), shape)
    for params in (ref, dev):
        assert params["scale"].min() >= 0.5 - 0.01 and params["scale"].max() <= 1.5 + 0.01
        angles = params["angle"][~np.isnan(params["angle"])]
        assert angles.min() >= -10 and angles.max() <= 10 and angles.min() < -9 and angles.max() > 9
        rotated = ~np.isnan(params["angle"])
        # independent steps: a flip says nothing about the rotation or the scale
        assert abs(np.mean(params["flip"] * rotated) - 0.25) < 0.04
        assert abs(params["scale"][params["flip"] == 1].mean() - params["scale"][params["flip"] == 0].mean()) < 0.05
    for key in ("flip", "scale", "angle", "top", "left"):
        a, b = ref[key][~np.isnan(ref[key])], dev[key][~np.isnan(dev[key])]
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (key, a.mean(), b.mean(), se)
        assert abs(a.std() - b.std()) < 0.1 * a.std(), (key, a.std(), b.std())
    assert abs(np.mean(~np.isnan(ref["angle"])) - np.mean(~np.isnan(dev["angle"]))) < 0.05  # rotation rate


def _loader_batches(root, tmp_path, workers: int, epoch: int, state: dict | None = None) -> list[dict]:
    cfg = compose([f"paths.output_dir={tmp_path}", "data=synthetic", f"data.root={root}", "data.synthetic=null",
                   "augment=report", "data.image_size=32", "data.batch_size=2", f"data.num_workers={workers}",
                   "data.device_augment=true"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    if state is not None:
        loader.load_state_dict(state)
    return [augment_batch(b) for b in loader]


def test_device_augmented_batches_are_identical_across_loaders_and_after_a_mid_epoch_restore(tmp_path):
    """With 2 workers: two loaders give the same augmented batches, a loader restored at batch 2 of epoch 1 gives
    the rest of them, 0 workers give the same; another epoch augments each image anew."""
    from segvoc.data.synthetic import generate

    root = tmp_path / "tiny"
    generate(root, num_train=10, num_val=2, sizes=[[40, 52], [52, 40]])
    first = _loader_batches(root, tmp_path, 2, epoch=1)
    assert len(first) == 5 and all(b["image"].shape == (2, 3, 32, 32) for b in first)
    assert all(torch.equal(b["size"], torch.tensor([[32, 32], [32, 32]])) for b in first)

    def same(a: list[dict], b: list[dict]) -> bool:
        return len(a) == len(b) and all(x["id"] == y["id"] and torch.equal(x["image"], y["image"])
                                        and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b, strict=True))

    assert same(first, _loader_batches(root, tmp_path, 2, epoch=1))
    assert same(first[2:], _loader_batches(root, tmp_path, 2, epoch=1, state={"epoch": 1, "batches": 2}))
    assert same(first, _loader_batches(root, tmp_path, 0, epoch=1))
    by_id = {i: img for b in first for i, img in zip(b["id"], b["image"], strict=True)}
    other = {i: img for b in _loader_batches(root, tmp_path, 2, epoch=2) for i, img in zip(b["id"], b["image"],
                                                                                         strict=True)}
    assert sum(not torch.equal(by_id[i], other[i]) for i in by_id) >= 8  # each epoch augments each image anew


def test_fit_runs_the_plans_on_the_device_side(smoke_cfg):
    """In a real fit the training step gets augmented, crop-sized batches (the datamodule's
    on_after_batch_transfer); the loader's batches fitted without the datamodule are refused, not trained on."""
    import pytorch_lightning as pl

    from segvoc.engine.builders import build_task

    cfg = smoke_cfg("augment=report", "data.device_augment=true", "model=null_conv", "data.num_workers=0",
                    "data.image_size=32")
    dm = build_datamodule(cfg)
    task = build_task(cfg, pretrained=False)
    shapes = []
    step = task.training_step
    task.training_step = lambda batch, *args: shapes.append(tuple(batch["image"].shape)) or step(batch, *args)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    assert shapes and all(s[1:] == (3, 32, 32) for s in shapes), shapes
    with pytest.raises(ConfigError, match="datamodule"):
        task.training_step(next(iter(dm.train_dataloader())), 0)


@pytest.mark.parametrize("step", [
    {"_target_": "albumentations.ColorJitter"},
    {"_target_": "albumentations.Rotate", "limit": 10, "border_mode": 4},
    {"_target_": "albumentations.PadIfNeeded", "min_height": 32, "min_width": 32, "position": "random"},
    {"_target_": "albumentations.RandomCrop", "height": 32, "width": 32, "pad_position": "random"},
    {"_target_": "albumentations.RandomScale", "scale_limit": 0.5, "area_for_downscale": "image"},
    {"_target_": "albumentations.Rotate", "limit": 10, "fill": [0, 0, 0]},
])
def test_unsupported_steps_are_one_line_naming_the_key_and_the_fix(step):
    with pytest.raises(ConfigError) as err:
        DeviceAugment.from_steps([{"_target_": "albumentations.HorizontalFlip", "p": 0.5}, step])
    message = str(err.value)
    assert "data.device_augment" in message and step["_target_"] in message and "\n" not in message
    assert "data.device_augment=false" in message


def test_unsupported_preset_fails_when_the_datamodule_is_built(tmp_path):
    from omegaconf import open_dict

    cfg = compose([f"paths.output_dir={tmp_path}", "augment=report", "data.device_augment=true"])
    with open_dict(cfg):
        cfg.augment.train.append({"_target_": "albumentations.GaussNoise"})
    with pytest.raises(ConfigError, match="GaussNoise"):
        build_datamodule(cfg)


def test_device_side_augmentation_makes_no_host_sync():
    """Counted as in tests/test_syncs.py (calls that would stall a GPU's stream): none per batch, rotations
    included (torchvision's ``F.rotate`` would make three blocking host-to-device copies per call)."""
    from segvoc.bench.syncs import SyncCounter

    device = DeviceAugment.from_steps(_report(32))
    samples = []
    for seed in range(6):
        image, mask = _pattern(40, 52)
        samples.append({"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "mask": torch.from_numpy(mask),
                        "id": str(seed), "augment": device.draw(seed, 40, 52)})
    batch = pad_collate(samples)
    assert any(op[0] == "rotate" for plan in batch["augment"] for op in plan.ops)
    with SyncCounter() as counter:
        counter.active = "train"
        augment_batch(batch)
        counter.active = None
    assert counter.total("train") == 0, counter.report()
