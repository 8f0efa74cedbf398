"""``SegmentationDataModule``: a dataset (VOC 2012, its synthetic stand-in, or your own folder) as Lightning's
train/val/test loaders."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from segvoc.data import synthetic
from segvoc.data.device_augment import DeviceAugment, augment_batch
from segvoc.data.fetch import prepare_tree
from segvoc.data.layouts import dataset_classes, open_layout
from segvoc.data.pairs import SegmentationPairs
from segvoc.data.sampling import EpochShuffleSampler, ResumableLoader, SizeGroupedBatches, epoch_position
from segvoc.data.transforms import build_pipeline, pad_collate


def resolve_loader_settings(num_workers: int | str, pin_memory: bool | str,
                            accelerator: str | None = None) -> tuple[int, bool]:
    """``auto`` workers = the CPUs this process may use, up to 8; ``auto`` pinning = when training on a GPU."""
    if num_workers == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(8, cpus)
    if pin_memory == "auto":
        pin_memory = accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available()
    return int(num_workers), bool(pin_memory)


def resolve_eval_batch_size(eval_batch_size: int | str, batch_size: int, accelerator: str | None = None) -> int:
    """``auto``: 1 on the CPU, where batching full-resolution images measured no faster (``segvoc.bench``), and the
    training batch size on a GPU. Batches only ever hold images of one size, so the value never changes scores."""
    if eval_batch_size == "auto":
        gpu = accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available()
        return int(batch_size) if gpu else 1
    return int(eval_batch_size)


class SegmentationDataModule(pl.LightningDataModule):
    """A dataset of images and masks in one of its layouts (``data.layout``: ``voc``, VOC 2012's official layout,
    ``test`` a seeded half of the official val list; ``folder``, your own ``images/``, ``masks/`` and
    ``classes.yaml``: ``segvoc.data.layouts``).

    Training samples go through the ``augment.train`` pipeline (fixed-size crops); val/test samples stay at
    full resolution, batched only with images of the same size (never padded), so metrics are computed on
    original masks and do not depend on ``eval_batch_size``. ``decode_cache`` reads training pairs from a one-time
    decoded copy (``segvoc.data.decoded``). ``device_augment``: workers only decode; the training augmentation's
    parameters travel with the batch and the device runs them (``segvoc.data.device_augment``).
    Samplers shard by rank themselves (run with ``use_distributed_sampler=False``): training order depends only on
    (seed, epoch), and evaluation scores every image exactly once, without DistributedSampler's padding.
    """

    def __init__(
        self,
        root: str,
        layout: str = "voc",
        train_split: str = "train",
        test_fraction: float = 0.5,
        split_seed: int = 0,
        subset: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | str = 1,
        num_workers: int | str = 2,
        pin_memory: bool | str = False,
        download: bool = False,
        urls: Mapping[str, str] | None = None,
        md5: Mapping[str, str | None] | None = None,
        augment: DictConfig | Mapping | None = None,
        synthetic: DictConfig | Mapping | None = None,
        split_dir: str | None = None,
        seed: int = 0,
        decode_cache: bool = False,
        cache_dir: str | None = None,
        device_augment: bool = False,
        num_classes: int | None = 21,
        class_names: Sequence[str] | None = None,
        colors: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        val_fraction: float = 0.1,
        image_size: int | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        accelerator: str | None = None,
    ) -> None:
        """The keys of ``conf/data`` (``image_size``, ``mean`` and ``std`` are read by the augmentation and the task;
        ``num_classes``, ``class_names``, ``colors``, ``ignore_index``: the classes, from the layout when not given),
        and what the run adds: ``augment`` (``conf/augment``), ``split_dir`` (where the id lists used are written),
        ``seed``, ``cache_dir`` and ``accelerator`` (for ``auto`` loader settings)."""
        super().__init__()
        self.root = root
        self.layout_name = layout
        self.train_split = train_split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.subset = subset
        self.batch_size = batch_size
        self.num_workers, self.pin_memory = resolve_loader_settings(num_workers, pin_memory, accelerator)
        self.eval_batch_size = resolve_eval_batch_size(eval_batch_size, batch_size, accelerator)
        self.download = download
        self.sources = {"urls": dict(urls or {}), "md5": dict(md5 or {})}
        self.augment = augment or {}
        self.synthetic_cfg = dict(synthetic) if synthetic else None
        self.split_dir = split_dir
        self.seed = seed
        self.decode_cache = decode_cache
        self.cache_dir = cache_dir
        data = {"layout": layout, "root": root, "num_classes": num_classes, "class_names": class_names,
                "colors": colors, "ignore_index": ignore_index}
        self.classes = dataset_classes(data)
        self.num_classes = self.classes.num_classes
        # translated now, so a preset it cannot run is one line before anything starts
        self.device_augment = DeviceAugment.from_steps(self.augment.get("train")) if device_augment else None
        self.layout: Any = None
        self.splits: dict[str, list[str]] = {}
        self.datasets: dict[str, SegmentationPairs] = {}

    def prepare_data(self) -> None:
        """Generate the synthetic tree, or (``download``) get what is missing of VOC 2012 and, for ``train_aug``,
        SBD, as ``segvoc.data.prepare`` does (rank 0 only under DDP)."""
        if self.synthetic_cfg is not None:
            synthetic.generate(self.root, **dict(self.synthetic_cfg))
        elif self.download and self.layout_name == "voc":
            prepare_tree(self.root, self.sources["urls"], self.sources["md5"], self.train_split)
        else:
            self._open()

    def setup(self, stage: str | None = None) -> None:
        """Resolve the tree, make the splits (cheap existence checks) and build the datasets."""
        if self.datasets:
            return
        if self.synthetic_cfg is not None:
            self.prepare_data()  # idempotent; needed when setup() is called without prepare_data()
        layout = self._open()
        self.splits = layout.splits(self.subset)
        train_tf = None if self.device_augment else build_pipeline(self.augment.get("train"))
        eval_tf = build_pipeline(self.augment.get("eval"))
        self.datasets = {
            split: SegmentationPairs(ids, [layout.image_path(split, i) for i in ids],
                                     [layout.mask_path(split, i) for i in ids], self.classes,
                                     train_tf if split == "train" else eval_tf, seed=self.seed)
            for split, ids in self.splits.items()
        }
        self.datasets["train"].device_augment = self.device_augment
        if self.decode_cache:
            self.datasets["train"].use_decode_cache(Path(self.cache_dir or self.root) / "decoded")
        if self.split_dir and rank_zero_only.rank == 0:
            self.write_splits(Path(self.split_dir))

    def _open(self) -> Any:
        """The dataset's layout, checked on disk (``segvoc.data.layouts.open_layout``)."""
        if self.layout is None:
            self.layout = open_layout({"layout": self.layout_name, "root": self.root, "train_split": self.train_split,
                                       "test_fraction": self.test_fraction, "val_fraction": self.val_fraction,
                                       "split_seed": self.split_seed}, self.classes)
        return self.layout

    def write_splits(self, out: Path) -> None:
        """Write the id lists actually used, one file per split, for provenance."""
        out.mkdir(parents=True, exist_ok=True)
        for name, ids in self.splits.items():
            (out / f"{name}.txt").write_text("\n".join(ids) + "\n")

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        """Training: shuffled per (seed, epoch), resumable mid-epoch, last partial batch dropped when a rank has
        more than one batch. Evaluation: every image once, batched with images of the same size."""
        n = len(self.datasets[split])
        rank, world = self._rank_world()
        if self.num_workers > 0:
            # Forked workers must not inherit a running OpenCV thread pool (a worker touching it deadlocks), and
            # each worker decoding with several threads would oversubscribe the cores: one OpenCV thread from here
            # on. Set when workers are about to start, not at import (predict's resizing keeps its threads).
            cv2.setNumThreads(1)
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                      persistent_workers=self.num_workers > 0, collate_fn=pad_collate)
        if not shuffle:  # full-resolution images, batched only with images of their own size (never padded)
            batches = SizeGroupedBatches(self.datasets[split].sizes(), batch_size, rank, world)
            return DataLoader(self.datasets[split], batch_sampler=batches, **common)
        sampler = EpochShuffleSampler(n, self.seed, rank, world)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # The epoch Lightning is about to run (restored from a checkpoint on resume). Lightning calls set_epoch
            # only after it created the first iterator, and loader workers start fetching at once: without this a
            # run resumed at an epoch end with workers would replay epoch 0's order and augmentation.
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        return ResumableLoader(self.datasets[split], sampler=sampler, batch_size=batch_size,
                               drop_last=len(sampler) > batch_size, progress=self._train_progress, **common)

    def _train_progress(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return epoch_position(trainer) if trainer is not None else (0, 1)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data.device_augment``: run each training sample's augmentation plan on the device (torchgeo's
        pattern); other batches pass through."""
        if isinstance(batch, dict) and "augment" in batch:
            batch = augment_batch(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
