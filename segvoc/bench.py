"""``python -m segvoc.bench``: speed of each model through a plain PyTorch loop and through segvoc's Trainer.

Prints a table and writes JSON::

  {"device", "torch", "threads",
   "models": {NAME: {plain_train_img_s, task_train_img_s, ratio, eval_img_s, train_gflop_per_img,
                     achieved_gflop_s, peak_mem_mb, frozen_train_over_eval?}},
   "loader": {img_s, workers, model_img_s, headroom},
   "scaling": {NAME: {SIZE: train_img_s}}}

``plain`` is a minimal loop (normalise, forward, loss, backward, step) on in-memory tensors; ``task`` runs the same
steps through ``Trainer.fit`` with ``SegmentationTask``, the run config's callbacks and TensorBoard logging (progress
bar off), timed after warm-up. ``ratio = task / plain``. The loader figure is the real train pipeline (JPEG decode,
albumentations, collate) on the synthetic tree.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segvoc.builders import build_datamodule, build_loss, build_model, build_task, build_trainer
from segvoc.config import CONF_DIR, compose
from segvoc.data.palette import VOC_CLASSES
from segvoc.feature_cache import FeatureCache

REPORT_MODELS = ["fcn_baseline", "fcn_dilated", "resnet34_transfer", "unet"]
REFERENCE_MODELS = ["fcn_resnet50", "deeplabv3_resnet50"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _cfg(model: str, args: argparse.Namespace, out: Path) -> Any:
    ov = [f"model={model}", f"paths.output_dir={out}", f"paths.output_root={out}", f"data.batch_size={args.batch_size}",
          f"trainer.precision={args.precision}", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
          "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
          f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
          *(f"perf.{k}={str(v).lower()}" for k, v in (("channels_last", args.channels_last),
                                                       ("compile", args.compile)) if v is not None)]
    if model in ("resnet34_transfer", *REFERENCE_MODELS):
        ov.append("model.weights=none")
    return compose(ov)


def _batch(args: argparse.Namespace, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, len(VOC_CLASSES), (args.batch_size, size, size), generator=g, dtype=torch.uint8)
    return x.to(device), y.to(device)


def _seconds_per_step(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Mean wall time of ``steps`` calls of ``step`` after ``warmup`` untimed calls (device-synchronised)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def plain_train(cfg: Any, args: argparse.Namespace, size: int, device: torch.device) -> dict[str, float]:
    """img/s of a minimal hand-written loop, plus eval img/s and FLOPs of one training step."""
    from segvoc.data.transforms import Normalize
    from segvoc.perf import prepare_model

    model = prepare_model(build_model(cfg.model, int(cfg.data.num_classes), pretrained=False), cfg.perf)
    model = model.to(device).train()
    norm = Normalize(cfg.data.mean, cfg.data.std).to(device)
    crit = build_loss(cfg).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = _batch(args, size, device)
    cl = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format

    def make_step(logits: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, args.precision):
                loss = crit(logits(), y)
            loss.backward()
            opt.step()

        return step

    step = make_step(lambda: model(norm(x).contiguous(memory_format=cl)))
    train_s = _seconds_per_step(step, args.warmup, args.steps, device)
    cached_s = None
    if getattr(model, "freeze_encoder", False) and hasattr(model, "decode"):
        # model.cache_features: the decoder trains from features computed once per image
        cache, ids = FeatureCache(model), [str(k) for k in range(len(x))]
        with _autocast(device, args.precision):
            cache.logits(norm(x).contiguous(memory_format=cl), ids)  # fills the cache
        cached_s = _seconds_per_step(make_step(lambda: cache.logits(norm(x).contiguous(memory_format=cl), ids)), 1,
                                     args.steps, device)

    flop = FlopCounterMode(display=False)
    with flop:
        step()
    model.eval()
    eval_flop = FlopCounterMode(display=False)
    with torch.no_grad(), _autocast(device, args.precision), eval_flop:
        model(norm(x))
    with torch.no_grad(), _autocast(device, args.precision):
        for _ in range(max(1, args.warmup)):
            model(norm(x))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model(norm(x).contiguous(memory_format=cl))
        _sync(device)
    eval_s = (time.perf_counter() - t0) / args.steps
    return {"train_img_s": args.batch_size / train_s, "eval_img_s": args.batch_size / eval_s,
            "train_gflop_per_img": flop.get_total_flops() / args.batch_size / 1e9,
            "eval_gflop_per_img": eval_flop.get_total_flops() / args.batch_size / 1e9,
            "cached_train_img_s": args.batch_size / cached_s if cached_s else None}


class StepTimer(Callback):
    """Times training steps ``warmup .. warmup+steps-1`` inside ``Trainer.fit`` (device-synchronised)."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            _sync(self.device)
            self.t1 = time.perf_counter()


def _repeat(batch: dict, n: int) -> DataLoader:
    """A loader that yields the same in-memory (already on-device) batch ``n`` times, without collation."""
    return DataLoader([batch] * n, batch_size=None, shuffle=False)


def task_train(cfg: Any, args: argparse.Namespace, size: int, device: torch.device) -> float:
    """img/s of the same steps through ``Trainer.fit`` + ``SegmentationTask`` with a real run's callbacks/logging."""
    x, y = _batch(args, size, device)
    batch = {"image": x, "mask": y, "id": ["bench"] * len(x)}
    val = {"image": x[:1, :, :32, :32], "mask": y[:1, :32, :32], "id": ["bench"]}
    task = build_task(cfg, pretrained=False)
    trainer = build_trainer(cfg)
    timer = StepTimer(args.warmup, args.steps, device)
    trainer.callbacks.append(timer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, train_dataloaders=_repeat(batch, args.warmup + args.steps), val_dataloaders=_repeat(val, 1))
    return args.batch_size * args.steps / (timer.t1 - timer.t0)


def loader_speed(args: argparse.Namespace, out: Path, batches: int) -> dict[str, float]:
    """img/s delivered by the real train DataModule (synthetic tree, default workers) after the first batch."""
    cfg = compose(["data=synthetic", f"paths.output_dir={out}", f"data.image_size={args.image_size}",
                   f"data.batch_size={args.batch_size}", "augment=report", "data.synthetic.num_train=256",
                   f"data.pin_memory={str(args.device == 'cuda').lower()}"]
                  + ([f"data.num_workers={args.workers}"] if args.workers is not None else []))
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            n += len(next(it)["image"])
        except StopIteration:
            it = iter(loader)
    return {"img_s": n / (time.perf_counter() - t0), "workers": dm.num_workers}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    out = Path(tempfile.mkdtemp(prefix="segvoc-bench-"))
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "threads": torch.get_num_threads(), "image_size":
                              args.image_size, "batch_size": args.batch_size, "precision": args.precision,
                              "channels_last": args.channels_last, "compile": args.compile,  # None = config
                              "models": {}, "scaling": {}}
    for name in args.models:
        cfg = _cfg(name, args, out / name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        plain = plain_train(cfg, args, args.image_size, device)
        task_img_s = task_train(cfg, args, args.image_size, device)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        row = {"plain_train_img_s": plain["train_img_s"], "task_train_img_s": task_img_s,
               "ratio": task_img_s / plain["train_img_s"], "eval_img_s": plain["eval_img_s"],
               "train_gflop_per_img": plain["train_gflop_per_img"],
               "achieved_gflop_s": task_img_s * plain["train_gflop_per_img"], "peak_mem_mb": peak}
        row["eval_gflop_per_img"] = plain["eval_gflop_per_img"]
        if name == "resnet34_transfer":  # time and FLOPs of a train step relative to an eval step
            row["frozen_train_over_eval"] = plain["eval_img_s"] / plain["train_img_s"]
            row["frozen_train_over_eval_flop"] = plain["train_gflop_per_img"] / plain["eval_gflop_per_img"]
            row["cached_train_img_s"] = plain["cached_train_img_s"]
            row["cached_train_over_eval"] = plain["eval_img_s"] / plain["cached_train_img_s"]
        result["models"][name] = row
        result["scaling"][name] = {str(s): (plain["train_img_s"] if s == args.image_size
                                            else plain_train(cfg, args, s, device)["train_img_s"])
                                   for s in args.sizes}
        print(f"{name:<20} plain {row['plain_train_img_s']:8.2f} img/s  task {task_img_s:8.2f} img/s  "
              f"ratio {row['ratio']:.3f}  eval {row['eval_img_s']:8.2f} img/s  "
              f"{row['train_gflop_per_img']:7.1f} GFLOP/img  {row['achieved_gflop_s']:9.1f} GFLOP/s  "
              f"peak {peak:8.0f} MB", flush=True)
    loader = loader_speed(args, out / "loader", args.loader_batches)
    base = result["models"].get("fcn_baseline") or next(iter(result["models"].values()))
    loader["model_img_s"] = base["task_train_img_s"]
    loader["headroom"] = loader["img_s"] / loader["model_img_s"]
    result["loader"] = loader
    print(f"{'loader':<20} {loader['img_s']:8.1f} img/s with {loader['workers']} workers; "
          f"headroom {loader['headroom']:.1f}x over the baseline's {loader['model_img_s']:.1f} img/s")
    for name, sizes in result["scaling"].items():
        print(f"{name:<20} scaling: " + "  ".join(f"{s}px {v:.2f} img/s" for s, v in sizes.items()))
    if args.json:
        from segvoc.utils import write_json

        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    available = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    p = argparse.ArgumentParser(prog="python -m segvoc.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=REPORT_MODELS + REFERENCE_MODELS, choices=available)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: conf/perf/default.yaml)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: conf/perf/default.yaml)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="sizes for the scaling table")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: data.num_workers)")
    p.add_argument("--loader-batches", type=int, default=30)
    p.add_argument("--json", default="outputs/bench.json")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (16 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.sizes = args.sizes or [args.image_size // 2, args.image_size]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
