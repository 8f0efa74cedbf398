"""``python -m segvoc.bench`` (``make bench``): what segvoc costs and what real-sized data needs, in one table.

Sections (all on this machine; JSON in ``--json``):

* ``models``: framework overhead. A plain hand-written step and segvoc's ``Trainer.fit`` step alternate step by
  step inside one fit (``ratio`` = task img/s / plain img/s, median of per-step ratios +- half their IQR), and the
  training FLOPs per image at 320 x 320 (``train_gflop_per_img``).
* ``loader``: the real train pipeline (JPEG decode, report augmentation, 320 crop, collate) on VOC-sized synthetic
  JPEGs (``data=synthetic_voc``): img/s with the default workers, per worker, and the decoding share; the same with
  ``data.decode_cache``, with ``data.device_augment`` (workers only decode) and with both.
* ``fit``: ``Trainer.fit`` with the real DataModule on that set; ``data_wait_fraction`` from Lightning's profiler.
* ``eval``: full-resolution evaluation img/s per ``data.eval_batch_size`` (batches hold one image size).
* ``scores``: seconds per VOC val epoch (1449 images) of the plain confusion matrix and of what per-image
  matrices, Boundary IoU and ECE add, and the bootstrap interval of one split.
* ``projection``: per model, the img/s a GPU at 25 % of its bf16 peak would consume at 320 x 320 and the loader
  workers that takes at the measured per-worker rate (plain, ``data.decode_cache``, ``data.device_augment``, both).
* ``compile`` (``--compile-study``, minutes): eager vs ``torch.compile`` per report model.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segvoc.app import quiet_library_noise
from segvoc.bench import throughput as tp
from segvoc.config import CONF_DIR, compose
from segvoc.utils import write_json

REPORT_MODELS = ["fcn_baseline", "fcn_dilated", "resnet34_transfer", "unet"]
REFERENCE_MODELS = ["fcn_resnet50", "deeplabv3_resnet50"]
PROJECTION_SIZE = 320  # the report's training crop
SECTIONS = ("null", "models", "loader", "fit", "eval", "scores")


def model_config(model: str, args: argparse.Namespace, out: Path, *extra: str) -> Any:
    """The run config of ``model`` for benchmarking (random weights, no progress bar, one epoch)."""
    ov = [f"model={model}", f"paths.output_dir={out}", f"paths.output_root={out}", f"data.batch_size={args.batch_size}",
          f"trainer.precision={args.precision}", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
          "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
          f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
          *(f"perf.{k}={str(v).lower()}" for k, v in (("channels_last", args.channels_last),
                                                       ("compile", args.compile)) if v is not None), *extra]
    if model in ("resnet34_transfer", *REFERENCE_MODELS):
        ov.append("model.weights=none")
    if model == "smp":
        ov.append("model.encoder_weights=none")
    return compose(ov)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sections; scratch runs (checkpoints, logs, the VOC-sized set) go to a temporary folder, removed at
    the end."""
    with tempfile.TemporaryDirectory(prefix="segvoc-bench-") as scratch:
        return _run(args, Path(scratch))


def _run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "settings": {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                     "warmup": args.warmup, "precision": args.precision, "channels_last": args.channels_last,
                     "compile": args.compile},
        "overhead": {}, "models": {}, "fit": {}, "eval": {}, "projection": {}}
    if "null" in args.sections:
        cfg = model_config("null_conv", args, out / "null", "data.batch_size=2")
        row = tp.framework_cost(cfg, 2, 32, args.warmup, args.null_steps, device, args.precision)
        result["overhead"]["null"] = row
        print(f"overhead (null model: one 1x1 conv, 32x32, batch 2, {row['steps']} steps each): plain "
              f"{row['plain_ms']:.2f} +- {row['plain_spread_ms']:.2f} ms/step, lightning_floor "
              f"{row['lightning_floor_ms']:.2f} +- {row['lightning_floor_spread_ms']:.2f}, segvoc "
              f"{row['segvoc_ms']:.2f} +- {row['segvoc_spread_ms']:.2f}; segvoc - floor "
              f"{row['segvoc_minus_floor_ms']:+.2f} ms", flush=True)
    if "models" not in args.sections:
        args.models = []
    if "fit" not in args.sections:
        args.fit_models = []
    if "eval" not in args.sections:
        args.eval_models = []
    if args.models:
        print(f"models: {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.steps} interleaved steps "
              f"after {args.warmup} ({result['device']}, {result['threads']} threads)", flush=True)
    for name in args.models:
        cfg = model_config(name, args, out / name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = tp.overhead(cfg, args.batch_size, args.image_size, args.warmup, args.steps, device, args.precision)
        row["train_gflop_per_img"] = tp.train_gflop_per_image(cfg, PROJECTION_SIZE, device)
        row["achieved_gflop_s"] = row["task_train_img_s"] * row["train_gflop_per_img"] * (
            args.image_size / PROJECTION_SIZE) ** 2
        row["peak_mem_mb"] = _peak_mb(device)
        result["models"][name] = row
        print(f"  {name:<20} plain {row['plain_train_img_s']:7.2f} img/s  task {row['task_train_img_s']:7.2f} img/s"
              f"  ratio {row['ratio']:.3f} +- {row['ratio_spread']:.3f}  {row['train_gflop_per_img']:6.1f} GFLOP/img"
              f" at {PROJECTION_SIZE}  {row['achieved_gflop_s']:6.1f} GFLOP/s", flush=True)

    if "loader" in args.sections:
        data_cfg = tp.voc_sized_config(out / "data", args.fit_batch_size, args.workers, device)
        loader = tp.loader(data_cfg, args.loader_batches)
        result["loader"] = loader
        print(f"loader: {loader['source_size']} JPEGs -> {loader['crop']} crops: {loader['img_s']:.1f} img/s with "
              f"{loader['workers']} workers, {loader['img_s_per_worker']:.1f} img/s per worker; decoding "
              f"{loader['decode_ms_per_image']:.1f} ms/img = {loader['decode_share']:.0%} of a worker's time; with "
              f"data.decode_cache=true {loader['img_s_decode_cache']:.1f} img/s "
              f"(x{loader['decode_cache_speedup']:.2f} per worker); with data.device_augment=true "
              f"{loader['img_s_device_augment']:.1f} img/s (x{loader['device_augment_speedup']:.2f} per worker; "
              f"the augmentation then takes {loader['device_augment_cpu_ms_per_image']:.1f} ms/img on one CPU "
              f"thread); with both {loader['img_s_decode_cache_device_augment']:.1f} img/s "
              f"(x{loader['decode_cache_device_augment_speedup']:.2f} per worker)", flush=True)

    for name in args.fit_models:
        cfg = model_config(name, args, out / f"fit_{name}", "data=synthetic_voc", "augment=report",
                           f"data.batch_size={args.fit_batch_size}", f"paths.output_root={out / 'data'}",
                           *([f"data.num_workers={args.workers}"] if args.workers is not None else []))
        fit = tp.fit_data_wait(cfg, args.fit_steps)
        result["fit"][name] = fit
        print(f"fit: {name:<20} {fit['img_s']:6.2f} img/s at {PROJECTION_SIZE} crops, batch {args.fit_batch_size}, "
              f"{fit['workers']} workers: data wait {fit['data_wait_fraction']:.3f} of the step time", flush=True)

    for name in args.eval_models:
        cfg = model_config(name, args, out / f"eval_{name}", "data=synthetic_voc", f"paths.output_root={out / 'data'}",
                           "data.num_workers=0")
        speeds = tp.eval_speed(cfg, args.eval_batch_sizes, args.eval_images, device)
        result["eval"][name] = speeds
        print(f"eval: {name:<20} " + "  ".join(f"batch {bs}: {v:6.2f} img/s" for bs, v in speeds.items())
              + " (full resolution, VOC-sized)", flush=True)

    if "scores" in args.sections:
        costs = tp.score_costs(device)
        result["scores"] = costs
        print("scores: seconds per validation epoch of 1449 VOC-sized images (batch 4): plain confusion matrix "
              f"{costs['confusion_s_per_epoch']:.2f}; added: per-image matrices "
              f"{costs['per_image_confusion_s_per_epoch']:.2f}"
              f", Boundary IoU {costs['boundary_iou_s_per_epoch']:.2f}, ECE {costs['ece_s_per_epoch']:.2f}; bootstrap "
              f"interval (1449 x 21 classes x 1000 resamples) {costs['bootstrap_s']:.2f}", flush=True)

    if "loader" in result and result["models"]:
        peak = args.peak_tflops * 1e12 * 0.25
        per_worker = {"": loader["img_s_per_worker"]}
        for key in ("decode_cache", "device_augment", "decode_cache_device_augment"):
            per_worker[f"_{key}"] = loader["img_s_per_worker"] * loader[f"{key}_speedup"]
        print(f"projection: a GPU at 25% of {args.peak_tflops:.0f} TFLOP/s ({args.peak_name}) at {PROJECTION_SIZE}x"
              f"{PROJECTION_SIZE}, fed at {loader['img_s_per_worker']:.1f} img/s per worker "
              f"({per_worker['_decode_cache']:.1f} with data.decode_cache=true, "
              f"{per_worker['_device_augment']:.1f} with data.device_augment=true, "
              f"{per_worker['_decode_cache_device_augment']:.1f} with both):")
        for name, row in result["models"].items():
            img_s = peak / (row["train_gflop_per_img"] * 1e9)
            here = row["task_train_img_s"] * (args.image_size / PROJECTION_SIZE) ** 2  # FLOP-scaled to 320
            proj = {"train_gflop_per_img": row["train_gflop_per_img"], "gpu_img_s_at_25pct_peak": img_s,
                    **{f"workers_for_gpu{key}": math.ceil(img_s / rate) for key, rate in per_worker.items()},
                    "train_img_s_here_est": here, "workers_for_here": math.ceil(here / loader["img_s_per_worker"])}
            result["projection"][name] = proj
            print(f"  {name:<20} {row['train_gflop_per_img']:6.1f} GFLOP/img  {img_s:8.0f} img/s  "
                  f"{proj['workers_for_gpu']:4d} workers ({proj['workers_for_gpu_decode_cache']} cached, "
                  f"{proj['workers_for_gpu_device_augment']} device-augmented, "
                  f"{proj['workers_for_gpu_decode_cache_device_augment']} both)  "
                  f"(this CPU: ~{here:.1f} img/s, {proj['workers_for_here']} worker)", flush=True)

    if args.compile_study:
        result["compile"] = {}
        for name in [m for m in args.models if m in REPORT_MODELS]:
            cfg = model_config(name, args, out / f"compile_{name}")
            c = tp.compile_study(cfg, args.batch_size, args.image_size, args.steps, device)
            c["break_even_images"] = tp.break_even_images(c["compile_s"], c["eager_img_s"], c["compiled_img_s"])
            result["compile"][name] = c
            be = c["break_even_images"]
            print(f"compile: {name:<20} compile {c['compile_s']:6.1f} s  eager {c['eager_img_s']:6.2f} img/s  "
                  f"compiled {c['compiled_img_s']:6.2f} img/s  (x{c['speedup']:.2f}); pays off after "
                  + (f"{be:.0f} images" if be else "never"), flush=True)

    result["seconds"] = time.perf_counter() - started
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return result


def gpu_check(args: argparse.Namespace) -> dict[str, Any]:
    """``--gpu-check``: the one-shot GPU check (``segvoc.bench.gpu_check``); writes ``args.gpu_check_json`` and
    prints a README-ready table. ``--dry-run``: every section on the CPU at tiny sizes."""
    from segvoc.bench import gpu_check as gc
    from segvoc.data.synthetic import generate

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("--gpu-check needs a CUDA device; on a machine without one, --gpu-check --dry-run runs every "
                         "section on the CPU at tiny sizes")
    args.device = "cpu" if dry else "cuda"
    args.precision = "bf16-mixed"
    args.batch_size = 2 if dry else 16
    size, steps = (32, 2) if dry else (PROJECTION_SIZE, 20)
    with tempfile.TemporaryDirectory(prefix="segvoc-gpu-check-") as scratch:
        out = Path(scratch)
        if dry:
            root = out / "data" / "synthetic"
            generate(root, num_train=12, num_val=2, height=40, width=48, seed=0)
            data = ["data=synthetic", f"data.root={root}", "data.synthetic=null", f"data.image_size={size}",
                    "data.num_workers=1"]
        else:
            data = ["data=synthetic_voc", "augment=report", f"paths.output_root={out / 'data'}"]

        def make_cfg(model: str, run_out: Path, *extra: str) -> Any:
            return model_config(model, args, run_out, *data, *extra)

        models = args.models if dry and args.models != REPORT_MODELS + REFERENCE_MODELS else REPORT_MODELS
        result = gc.run_check(make_cfg, out, torch.device(args.device), models, size,
                              args.batch_size, steps, args.precision, "eager" if dry else "inductor",
                              [1, 2] if dry else [1, 4, 8, 16], 2 if dry else 32, dry)
    write_json(Path(args.gpu_check_json), result)
    print(gc.table(result))
    print(f"wrote {args.gpu_check_json} ({result['seconds']:.0f} s)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    available = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    p = argparse.ArgumentParser(prog="python -m segvoc.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=REPORT_MODELS + REFERENCE_MODELS, choices=available)
    p.add_argument("--image-size", type=int, default=None, help="overhead section (default: 128 on CPU, 512 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="interleaved timed steps (default: 16 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: conf/perf/default.yaml)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: conf/perf/default.yaml)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: data.num_workers)")
    p.add_argument("--loader-batches", type=int, default=12)
    p.add_argument("--fit-models", nargs="*", default=["fcn_baseline", "resnet34_transfer"], choices=available)
    p.add_argument("--fit-steps", type=int, default=10)
    p.add_argument("--fit-batch-size", type=int, default=8, help="fit and loader sections (default: 8, as data.*)")
    p.add_argument("--eval-models", nargs="*", default=["fcn_baseline", "resnet34_transfer"], choices=available)
    p.add_argument("--eval-images", type=int, default=16, help="VOC-sized val images per eval measurement")
    p.add_argument("--eval-batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--peak-tflops", type=float, default=989.4, help="GPU bf16 dense peak for the projection")
    p.add_argument("--peak-name", default="NVIDIA H100 SXM bf16 dense")
    p.add_argument("--compile-study", action="store_true", help="also time torch.compile per report model (slow)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="which sections to run (projection needs models and loader)")
    p.add_argument("--null-steps", type=int, default=100,
                   help="timed steps per fit in the null overhead section (4 rounds of floor and segvoc fits; with "
                        "20, segvoc - floor moved by 0.4 ms from run to run on a 2-core machine, with 100 by 0.06)")
    p.add_argument("--json", default="outputs/bench.json")
    p.add_argument("--gpu-check", action="store_true",
                   help="the one-shot GPU check (make gpu-check): report models at 320x320 bf16 batch 16, eager and "
                        "compiled; fit data wait; host syncs; eval img/s; deterministic resume")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: every section on the CPU, tiny sizes "
                                                          "(--models picks the models; default: the report's)")
    p.add_argument("--gpu-check-json", default="outputs/gpu_check.json")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.image_size = args.image_size or (512 if gpu else 128)
    args.batch_size = args.batch_size or (16 if gpu else 4)
    args.steps = args.steps or (30 if gpu else 16)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet_library_noise()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # "GPU available ..." per fit, in a table
    args = parse_args(argv)
    return gpu_check(args) if args.gpu_check else run(args)

