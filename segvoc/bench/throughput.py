"""Speed measurements behind ``segvoc.bench``: framework overhead, FLOPs, loader, data-wait in a fit, evaluation.

Every function returns plain numbers; ``segvoc.bench`` decides what to run, prints and writes them.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segvoc.data.device_augment import DeviceAugment, augment_batch
from segvoc.data.transforms import Normalize
from segvoc.engine.builders import build, build_datamodule, build_loss, build_model, build_task, build_trainer
from segvoc.engine.perf import prepare_model


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so wall times measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast for ``bf16-mixed``, else a disabled autocast."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def random_batch(batch_size: int, size: int, device: torch.device, seed: int = 0,
                 classes: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N,3,S,S) and masks (N,S,S) of random content (labels of ``classes`` classes: VOC's 21)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (batch_size, size, size), generator=g, dtype=torch.uint8)
    return x.to(device), y.to(device)


def quantiles(values: Sequence[float]) -> tuple[float, float]:
    """(median, half the interquartile range) of ``values``."""
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return med, (q3 - q1) / 2


class PlainStep:
    """A minimal hand-written training step (normalise, forward, loss, backward, Adam step) on its own copy of the
    model: what a user would write without segvoc."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, batch: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device, precision: str) -> None:
        self.model = model.to(device).train()
        self.norm = Normalize(cfg.data.mean, cfg.data.std, channels_last=bool(cfg.perf.channels_last)).to(device)
        self.crit = build_loss(cfg).to(device)
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.x, self.y = batch
        self.device, self.precision = device, precision

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.crit(self.model(self.norm(self.x)), self.y)
        loss.backward()
        self.opt.step()


class InterleavedPlainStep(Callback):
    """Runs one plain step after every ``Trainer.fit`` step and times both: the task's step is the wall time from
    the end of the previous plain step to the end of this training batch (Lightning's loop, hooks and logging
    included); the plain step is timed on its own. Alternating step by step puts both under the same machine
    conditions, so their ratio does not drift with the load of the machine."""

    def __init__(self, plain: PlainStep, warmup: int, clock: Any = time.perf_counter) -> None:
        self.plain, self.warmup, self.clock = plain, warmup, clock
        self.task_s: list[float] = []
        self.plain_s: list[float] = []
        self._mark: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._mark is None:  # the first step has nothing before it to time from
            sync(self.plain.device)
            self._mark = self.clock()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync(self.plain.device)
        t0 = self.clock()
        task = t0 - (self._mark or t0)
        self.plain()
        sync(self.plain.device)
        t1 = self.clock()
        if batch_idx >= self.warmup:
            self.task_s.append(task)
            self.plain_s.append(t1 - t0)
        self._mark = self.clock()


def _repeat(batch: dict, n: int) -> DataLoader:
    """A loader that yields the same in-memory (already on-device) batch ``n`` times, without collation."""
    return DataLoader([batch] * n, batch_size=None, shuffle=False)


def _interleaved_fit(module: pl.LightningModule, trainer: pl.Trainer, plain: PlainStep, batch: dict, warmup: int,
                     steps: int, val: dict | None = None, clock: Any = time.perf_counter) -> InterleavedPlainStep:
    """``trainer.fit(module)`` on ``warmup + steps`` copies of ``batch`` with ``plain`` run after each step."""
    probe = InterleavedPlainStep(plain, warmup, clock)
    trainer.callbacks.append(probe)
    with warnings.catch_warnings():
        # a one-batch validation loader and a tiny epoch are what this probe wants; Lightning warns about both
        warnings.filterwarnings("ignore", message=r".*(does not have many workers|number of training batches).*")
        # a frozen encoder (resnet34_transfer) stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, train_dataloaders=_repeat(batch, warmup + steps),
                    val_dataloaders=_repeat(val, 1) if val is not None else None)
    return probe


def overhead(cfg: DictConfig, batch_size: int, size: int, warmup: int, steps: int, device: torch.device,
             precision: str) -> dict[str, float]:
    """Task vs plain training speed, interleaved step by step inside one ``Trainer.fit`` (the run config's
    callbacks and TensorBoard logging on). ``ratio`` = task img/s / plain img/s as the median of per-step ratios,
    ``ratio_spread`` half their interquartile range."""
    x, y = random_batch(batch_size, size, device)
    task = build_task(cfg, pretrained=False)
    plain = PlainStep(copy.deepcopy(task.model), cfg, (x, y), device, precision)
    batch = {"image": x, "mask": y, "id": ["bench"] * len(x)}
    val = {"image": x[:1, :, :32, :32], "mask": y[:1, :32, :32], "id": ["bench"]}
    probe = _interleaved_fit(task, build_trainer(cfg), plain, batch, warmup, steps, val)
    ratios = [p / t for p, t in zip(probe.plain_s, probe.task_s, strict=True)]
    ratio, spread = quantiles(ratios)
    return {"plain_train_img_s": batch_size / statistics.median(probe.plain_s),
            "task_train_img_s": batch_size / statistics.median(probe.task_s),
            "ratio": ratio, "ratio_spread": spread, "steps": len(ratios)}


class FloorModule(pl.LightningModule):
    """The Lightning floor: a bare ``LightningModule`` with the plain step's model, normalisation, loss and Adam,
    logging its loss as ``SegmentationTask`` does (``on_step`` and ``on_epoch``), and nothing else."""

    def __init__(self, plain: PlainStep) -> None:
        super().__init__()
        self.model, self.norm, self.crit = plain.model, plain.norm, plain.crit

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.crit(self.model(self.norm(batch["image"])), batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)


def framework_cost(cfg: DictConfig, batch_size: int, size: int, warmup: int, steps: int, device: torch.device,
                   precision: str, rounds: int = 4) -> dict[str, float]:
    """ms per training step of the bare loop (``plain``), a bare LightningModule (``lightning_floor``) and
    ``SegmentationTask`` with the run's callbacks and loggers (``segvoc``), each Lightning fit with plain steps
    interleaved (``InterleavedPlainStep``); floor and segvoc fits alternate ``rounds`` times. Medians over the
    steps, ``*_spread`` half their IQR; ``segvoc_minus_floor_ms`` is the difference of the paired per-step costs
    (fit step - plain step) of the two. On a CPU: one intra-op thread (ops this small gain nothing from more, and on
    a busy CPU every multi-threaded op waits for a second core) and the main thread's CPU time as the clock (all
    work of a step then runs on it; wall time on a shared machine would time the machine's load). On CUDA: wall
    time after a device sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _framework_cost(cfg, batch_size, size, warmup, steps, device, precision, rounds)
    finally:
        torch.set_num_threads(threads)


def _framework_cost(cfg: DictConfig, batch_size: int, size: int, warmup: int, steps: int, device: torch.device,
                    precision: str, rounds: int) -> dict[str, float]:
    x, y = random_batch(batch_size, size, device)
    batch = {"image": x, "mask": y, "id": ["bench"] * len(x)}
    val = {"image": x[:1], "mask": y[:1], "id": ["bench"]}
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    times: dict[str, list[float]] = {"plain": [], "lightning_floor": [], "segvoc": []}
    extra: dict[str, list[float]] = {"lightning_floor": [], "segvoc": []}
    for _ in range(rounds):
        for kind in ("lightning_floor", "segvoc"):
            task = build_task(cfg, pretrained=False)
            plain = PlainStep(copy.deepcopy(task.model), cfg, (x, y), device, precision)
            if kind == "segvoc":
                probe = _interleaved_fit(task, build_trainer(cfg), plain, batch, warmup, steps, val, clock)
            else:
                floor = FloorModule(PlainStep(copy.deepcopy(task.model), cfg, (x, y), device, precision))
                trainer = build(cfg.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=[],
                                enable_model_summary=False, num_sanity_val_steps=0)
                probe = _interleaved_fit(floor, trainer, plain, batch, warmup, steps, clock=clock)
            times["plain"] += probe.plain_s
            times[kind] += probe.task_s
            extra[kind] += [t - p for t, p in zip(probe.task_s, probe.plain_s, strict=True)]
    result: dict[str, float] = {}
    for kind, values in times.items():
        med, spread = quantiles([1000 * v for v in values])
        result[f"{kind}_ms"], result[f"{kind}_spread_ms"] = med, spread
    result["segvoc_minus_floor_ms"] = 1000 * (statistics.median(extra["segvoc"])
                                              - statistics.median(extra["lightning_floor"]))
    result["steps"] = len(times["segvoc"])
    result["clock"] = "wall" if device.type == "cuda" else "main-thread CPU time, 1 thread"
    return result


def train_gflop_per_image(cfg: DictConfig, size: int, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) per image at ``size`` x ``size``, counted by torch."""
    x, y = random_batch(2, size, device)  # 2: BatchNorm after global pooling (DeepLabV3's ASPP) needs a batch
    model = build_model(cfg.model, int(cfg.data.num_classes), pretrained=False)
    step = PlainStep(prepare_model(model, {"channels_last": cfg.perf.channels_last}), cfg, (x, y), device,
                     "32-true")
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / 2 / 1e9


def voc_sized_config(out: Path, batch_size: int, workers: int | None, device: torch.device,
                     extra: Sequence[str] = ()) -> DictConfig:
    """``data=synthetic_voc`` (VOC-sized JPEGs) with the report's augmentation and 320-pixel crops."""
    from segvoc.config import compose

    ov = ["data=synthetic_voc", f"paths.output_dir={out}", "augment=report", f"data.batch_size={batch_size}",
          f"data.pin_memory={str(device.type == 'cuda').lower()}", *extra]
    if workers is not None:
        ov.append(f"data.num_workers={workers}")
    return compose(ov)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread, as in a DataLoader worker: the one-process loader rates are then per-worker rates (with
    more threads, the collate's tensor copies spin OpenMP threads that, on a busy machine, cost more than they do)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _images_per_second(loader: DataLoader, batches: int) -> float:
    if loader.num_workers == 0 and torch.get_num_threads() > 1:
        with _one_thread():
            return _images_per_second(loader, batches)
    it = iter(loader)
    next(it)  # worker start-up and the first fetch are not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["image"])
        except StopIteration:
            it = iter(loader)
    return n / (time.perf_counter() - t0)


def loader(cfg: DictConfig, batches: int) -> dict[str, Any]:
    """The real train pipeline (JPEG decode, report augmentation, crop, collate) on VOC-sized images: img/s with
    the configured workers, img/s of one process (= per worker), and the share of that spent decoding."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    train = dm.datasets["train"]
    sizes = train.sizes()
    result: dict[str, Any] = {"source_size": f"{statistics.median(w for _, w in sizes):.0f}x"
                                             f"{statistics.median(h for h, _ in sizes):.0f} (median WxH, mixed "
                                             "orientations)",
                              "crop": int(cfg.data.image_size), "workers": dm.num_workers}
    result["img_s"] = _images_per_second(dm.train_dataloader(), batches)
    single = copy.copy(dm)
    single.num_workers = 0
    result["img_s_one_process"] = _images_per_second(single.train_dataloader(), max(2, batches // 3))
    result["img_s_per_worker"] = (result["img_s"] / dm.num_workers if dm.num_workers
                                  else result["img_s_one_process"])
    # decoding alone and the whole item (decode + augmentation + crop), interleaved image by image on one thread so
    # that both see the same machine: timed apart, a change of load between the two made the share exceed 1
    n = min(len(train), 24)
    decode_s = item_s = 0.0
    with _one_thread():
        for k in range(n):
            t0 = time.perf_counter()
            train.load(k)
            t1 = time.perf_counter()
            train[k]
            decode_s, item_s = decode_s + t1 - t0, item_s + time.perf_counter() - t1
    result["decode_ms_per_image"] = 1000 * decode_s / n
    result["decode_share"] = decode_s / item_s
    # the remedy: data.decode_cache (decode once, memory-map), same pipeline otherwise
    cached = copy.copy(single)
    cached.datasets = dict(dm.datasets)
    cached.datasets["train"] = copy.copy(train)
    cached.datasets["train"].use_decode_cache(Path(str(cfg.paths.cache_dir)) / "decoded")
    cached.datasets["train"][0]  # warm the page cache as a second epoch would
    result["img_s_decode_cache_one_process"] = _images_per_second(cached.train_dataloader(), max(2, batches // 3))
    result["decode_cache_speedup"] = result["img_s_decode_cache_one_process"] / result["img_s_one_process"]
    cached.num_workers = dm.num_workers
    result["img_s_decode_cache"] = _images_per_second(cached.train_dataloader(), batches)
    # data.device_augment: the workers only decode (or read the cache) and draw the parameters; the device augments
    for key, source in (("device_augment", single), ("decode_cache_device_augment", cached)):
        dev = _with_device_augment(source, cfg)
        dev.num_workers = 0
        result[f"img_s_{key}_one_process"] = _images_per_second(dev.train_dataloader(), max(2, batches // 3))
        result[f"{key}_speedup"] = result[f"img_s_{key}_one_process"] / result["img_s_one_process"]
        dev.num_workers = dm.num_workers
        result[f"img_s_{key}"] = _images_per_second(dev.train_dataloader(), batches)
    # what the device then does, timed here on one CPU thread (a GPU does it far faster): ms per image
    it = iter(_with_device_augment(single, cfg).train_dataloader())
    batches_ = [next(it) for _ in range(3)]
    with _one_thread():
        t0 = time.perf_counter()
        for batch in batches_:
            augment_batch(batch)
        result["device_augment_cpu_ms_per_image"] = 1000 * (time.perf_counter() - t0) / sum(
            len(b["id"]) for b in batches_)
    return result


def _with_device_augment(dm: Any, cfg: DictConfig) -> Any:
    """A shallow copy of ``dm`` whose train split hands over decoded pairs and plans (``data.device_augment``)."""
    dev = copy.copy(dm)
    dev.datasets = dict(dm.datasets)
    dev.datasets["train"] = copy.copy(dm.datasets["train"])
    dev.datasets["train"].transform = None
    dev.datasets["train"].device_augment = DeviceAugment.from_steps(cfg.augment.get("train"))
    return dev


def fit_data_wait(cfg: DictConfig, steps: int) -> dict[str, float]:
    """``Trainer.fit`` with the real DataModule for ``steps`` training batches, timed by Lightning's
    ``SimpleProfiler``: the share of the step time spent waiting for the next batch (first batch excluded)."""
    from pytorch_lightning.profilers import SimpleProfiler

    with open_dict(cfg):
        cfg.trainer.update(limit_train_batches=steps + 1, limit_val_batches=0, num_sanity_val_steps=0,
                           max_epochs=1, enable_checkpointing=False, enable_progress_bar=False)
        cfg.logger = None
        cfg.callbacks = {}
    dm = build_datamodule(cfg)
    task = build_task(cfg, pretrained=False)
    profiler = SimpleProfiler()
    trainer = build_trainer(cfg)
    trainer.profiler = profiler
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(limit_val_batches|val_dataloader).*")
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(task, datamodule=dm)
    durations = profiler.recorded_durations
    wait = durations["[_TrainingEpochLoop].train_dataloader_next"][1:steps + 1]
    compute = durations["run_training_batch"][1:steps + 1]
    total = sum(wait) + sum(compute)
    return {"data_wait_fraction": sum(wait) / total, "img_s": int(cfg.data.batch_size) * len(compute) / total,
            "steps": len(compute), "workers": dm.num_workers}


def eval_speed(cfg: DictConfig, batch_sizes: Sequence[int], images: int, device: torch.device) -> dict[str, float]:
    """Full-resolution evaluation img/s (``predict_log_probs`` + argmax over the val split's VOC-sized images) for
    each eval batch size."""
    task = build_task(cfg, pretrained=False).to(device).eval()
    result = {}
    for bs in batch_sizes:
        with open_dict(cfg):
            cfg.data.eval_batch_size = bs
            cfg.data.subset = images
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        batches = [b["image"].to(device) for b in dm.val_dataloader()]
        with torch.no_grad():
            task.predict_log_probs(batches[0]).argmax(1)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                task.predict_log_probs(b).argmax(1)
            sync(device)
        result[str(bs)] = sum(len(b) for b in batches) / (time.perf_counter() - t0)
    return result


def compile_study(cfg: DictConfig, batch_size: int, size: int, steps: int, device: torch.device) -> dict[str, float]:
    """Eager vs ``torch.compile`` plain training: compile time (first step minus an eager step) and steady-state
    img/s of each."""
    x, y = random_batch(batch_size, size, device)
    result = {}
    for compiled in (False, True):
        model = build_model(cfg.model, int(cfg.data.num_classes), pretrained=False)
        model = prepare_model(model, {"channels_last": cfg.perf.channels_last, "compile": compiled})
        step = PlainStep(model, cfg, (x, y), device, "32-true")
        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0
        step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        key = "compiled" if compiled else "eager"
        result[f"{key}_img_s"] = batch_size / statistics.median(times)
        result[f"{key}_first_step_s"] = first
    result["compile_s"] = result["compiled_first_step_s"] - batch_size / result["eager_img_s"]
    result["speedup"] = result["compiled_img_s"] / result["eager_img_s"]
    return result


def break_even_images(compile_s: float, eager_img_s: float, compiled_img_s: float) -> float | None:
    """Images after which compiling has paid for itself (None when compiled is not faster)."""
    saved_per_image = 1 / eager_img_s - 1 / compiled_img_s
    return compile_s / saved_per_image if saved_per_image > 0 else None



def score_costs(device: torch.device, images: int = 1449, batch_size: int = 4, height: int = 375, width: int = 500,
                batches: int = 3, resamples: int = 1000, classes: int = 21) -> dict[str, float]:
    """Seconds per validation epoch of ``images`` VOC-sized images that each score costs on ``device``, measured on
    ``batches`` random batches and scaled: the plain confusion matrix, and what the per-image matrices, Boundary
    IoU and ECE add; plus the bootstrap interval of one split (``images`` x 21 classes x ``resamples``)."""
    import numpy as np

    from segvoc.evaluation.boundary import boundary_counts
    from segvoc.evaluation.calibration import calibration_bins
    from segvoc.evaluation.metrics import confusion_counts
    from segvoc.evaluation.per_image import per_image_confusion
    from segvoc.evaluation.statistics import bootstrap_ci

    c = classes
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(batch_size, c, height, width, generator=g).log_softmax(1).to(device)
    target = torch.randint(0, c, (batch_size, height, width), generator=g).to(device)
    preds = log_probs.argmax(1)
    steps = {"confusion": lambda: confusion_counts(preds, target, c),
             "per_image_confusion": lambda: per_image_confusion(preds, target, c),
             "boundary_iou": lambda: boundary_counts(preds, target, c),
             "ece": lambda: calibration_bins(log_probs, target)}
    out: dict[str, float] = {}
    for name, step in steps.items():
        step()
        sync(device)
        started = time.perf_counter()
        for _ in range(batches):
            step()
        sync(device)
        out[f"{name}_s_per_epoch"] = (time.perf_counter() - started) / (batches * batch_size) * images
    rng = np.random.default_rng(0)
    per_image = {"confusion": rng.integers(0, 5000, size=(images, c, c)),
                 "boundary": rng.integers(0, 500, size=(images, 2, c))}
    started = time.perf_counter()
    bootstrap_ci(per_image, resamples)
    out["bootstrap_s"] = time.perf_counter() - started
    return out
