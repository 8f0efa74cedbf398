"""The one-shot GPU check behind ``python -m segvoc.bench --gpu-check`` (``make gpu-check``).

Sections, each a plain dict in ``outputs/gpu_check.json``: the card; per report model training img/s eager and
compiled with the fraction of the card's bf16 peak; the data wait of a real fit; host syncs per training step;
evaluation img/s by batch size; a short ``trainer.deterministic=true`` resume check. ``dry_run`` runs every section
on the CPU at tiny sizes (the test suite does), so the script cannot rot before a GPU is lent.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from segvoc.bench import throughput as tp
from segvoc.bench.syncs import SyncCounter, SyncWindow
from segvoc.engine.builders import build_datamodule, build_model, build_task, build_trainer
from segvoc.engine.perf import prepare_model

# dense bf16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match wins
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2, "V100": 0.0}


def bf16_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak from ``BF16_PEAK_TFLOPS`` (None when unknown or without bf16 tensor cores)."""
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak or None
    return None


def train_speed(cfg: DictConfig, batch_size: int, size: int, steps: int, device: torch.device, precision: str,
                compile_backend: str | None) -> dict[str, float]:
    """Steady-state plain training img/s (``throughput.PlainStep``), eager or ``torch.compile``d with
    ``compile_backend``; the first (compiling) step's seconds."""
    x, y = tp.random_batch(batch_size, size, device)
    model = prepare_model(build_model(cfg.model, int(cfg.data.num_classes), pretrained=False),
                          {"channels_last": cfg.perf.channels_last})
    if compile_backend:
        model.compile(backend=compile_backend)
    step = tp.PlainStep(model, cfg, (x, y), device, precision)
    t0 = time.perf_counter()
    step()
    tp.sync(device)
    first = time.perf_counter() - t0
    step()
    tp.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    tp.sync(device)
    return {"img_s": batch_size * steps / (time.perf_counter() - t0), "first_step_s": first}


def count_syncs(cfg: DictConfig, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Host syncs per training step of a real fit (progress bar on, ``log_every_n_steps`` 100). On CUDA the
    warnings of ``torch.cuda.set_sync_debug_mode("warn")`` are counted (they see syncs inside kernels too); on the
    CPU the patched calls of ``bench.syncs``."""
    import warnings

    with open_dict(cfg):
        cfg.trainer.update(max_epochs=1, limit_train_batches=warmup + steps + 1, num_sanity_val_steps=0,
                           log_every_n_steps=100, enable_progress_bar=True, limit_val_batches=1)
    dm, task, trainer = build_datamodule(cfg), build_task(cfg, pretrained=False), build_trainer(cfg)
    counter = SyncCounter()
    window = SyncWindow(counter, warmup, steps)
    trainer.callbacks.append(window)
    if device.type != "cuda":
        with counter:
            trainer.fit(task, datamodule=dm)
        return {"method": "patched calls (CPU proxy)", "per_step": window.per_step,
                "sites": counter.report(5).splitlines()}
    class _Collect(SyncWindow):
        def on_train_batch_start(self, *args: Any) -> None:
            super().on_train_batch_start(*args)
            torch.cuda.set_sync_debug_mode("warn" if self.counter.active == "train" else 0)

    trainer.callbacks[-1] = window = _Collect(counter, warmup, steps)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            trainer.fit(task, datamodule=dm)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    caught = [str(r.message).splitlines()[0] for r in records if "synchroniz" in str(r.message)]
    return {"method": "torch.cuda.set_sync_debug_mode('warn')", "per_step": len(caught) / steps,
            "sites": sorted(set(caught))[:5]}


def resume_check(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """``trainer.deterministic=true``: two epochs straight vs one epoch, then resumed from its last checkpoint for
    the second; the final weights must be bit-identical."""
    def fit(run: str, epochs: int, ckpt: str | None = None) -> dict[str, torch.Tensor]:
        c = copy.deepcopy(cfg)
        with open_dict(c):
            c.paths.output_dir = str(out / run)
            c.trainer.update(max_epochs=epochs, deterministic=True, num_sanity_val_steps=0)
        pl.seed_everything(int(c.seed), workers=True)  # as segvoc.train: the same initial weights in each run
        task = build_task(c, pretrained=False)
        build_trainer(c).fit(task, datamodule=build_datamodule(c), ckpt_path=ckpt)
        return {k: v.detach().cpu().clone() for k, v in task.model.state_dict().items()}

    # Trainer(deterministic=True) sets process-wide flags; put them back for whatever runs next in this process
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        straight = fit("straight", 2)
        fit("first", 1)
        resumed = fit("first", 2, str(out / "first" / "checkpoints" / "last.ckpt"))
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
    diff = max(float((straight[k].double() - resumed[k].double()).abs().max()) for k in straight)
    return {"bit_identical": all(torch.equal(straight[k], resumed[k]) for k in straight), "max_abs_diff": diff}


def run_check(make_cfg: Callable[..., DictConfig], out: Path, device: torch.device, models: Sequence[str],
              size: int, batch_size: int, steps: int, precision: str, compile_backend: str,
              eval_batch_sizes: Sequence[int], eval_images: int, dry_run: bool,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section; ``make_cfg(model, out, *overrides)`` composes a run config."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    peak = bf16_peak_tflops(name)
    result: dict[str, Any] = {"card": name, "bf16_peak_tflops": peak, "dry_run": dry_run, "torch": torch.__version__,
                              "settings": {"size": size, "batch_size": batch_size, "precision": precision,
                                           "compile_backend": compile_backend}, "models": {}}
    started = time.perf_counter()
    for model in models:
        cfg = make_cfg(model, out / f"m_{model}")
        gflop = tp.train_gflop_per_image(cfg, size, device)
        row: dict[str, Any] = {"train_gflop_per_img": gflop}
        for mode, backend in (("eager", None), ("compiled", compile_backend)):
            s = train_speed(cfg, batch_size, size, steps, device, precision, backend)
            row[f"{mode}_img_s"] = s["img_s"]
            row[f"{mode}_first_step_s"] = s["first_step_s"]
            row[f"{mode}_peak_fraction"] = s["img_s"] * gflop * 1e9 / (peak * 1e12) if peak else None
        result["models"][model] = row
        log(f"model {model}: eager {row['eager_img_s']:.1f} img/s, compiled {row['compiled_img_s']:.1f} img/s")
    data = make_cfg("fcn_baseline", out / "data_cfg")
    with open_dict(data):
        data.trainer.limit_val_batches = 1
    fit_cfg = copy.deepcopy(data)
    with open_dict(fit_cfg):
        fit_cfg.logger = None
        fit_cfg.callbacks = {}
    device_cfg = copy.deepcopy(fit_cfg)
    with open_dict(device_cfg):
        device_cfg.data.device_augment = True
    result["fit"] = {"without_device_augment": tp.fit_data_wait(fit_cfg, steps),
                     "with_device_augment": tp.fit_data_wait(device_cfg, steps)}
    log("fit data wait: " + ", ".join(f"{k} {v['data_wait_fraction']:.3f}" for k, v in result["fit"].items()))
    result["syncs"] = count_syncs(copy.deepcopy(data), 2, min(steps, 5), device)
    log(f"host syncs per training step: {result['syncs']['per_step']:.2f} ({result['syncs']['method']})")
    ev = copy.deepcopy(data)
    with open_dict(ev):
        ev.data.num_workers = 0
    result["eval"] = {"fcn_baseline": tp.eval_speed(ev, eval_batch_sizes, eval_images, device)}
    log("eval img/s by batch size: " + ", ".join(f"{k}: {v:.1f}" for k, v in result["eval"]["fcn_baseline"].items()))
    result["resume"] = resume_check(copy.deepcopy(data), out / "resume")
    log(f"deterministic resume: bit-identical {result['resume']['bit_identical']}")
    result["seconds"] = time.perf_counter() - started
    return result


def table(result: dict[str, Any]) -> str:
    """The README-ready markdown table of a gpu-check result."""
    peak = result["bf16_peak_tflops"]
    s = result["settings"]
    lines = [f"GPU check on **{result['card']}** (torch {result['torch']}; {s['size']}x{s['size']}, batch "
             f"{s['batch_size']}, {s['precision']}; bf16 peak {peak or 'unknown'} TFLOP/s)", "",
             "| model | eager img/s | compiled img/s | eager % of peak | compiled % of peak |", "|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return f"{100 * v:.1f} %" if v is not None else "n/a"

    for name, row in result["models"].items():
        lines.append(f"| {name} | {row['eager_img_s']:.1f} | {row['compiled_img_s']:.1f} | "
                     f"{pct(row['eager_peak_fraction'])} | {pct(row['compiled_peak_fraction'])} |")
    fit, dev = result["fit"]["without_device_augment"], result["fit"]["with_device_augment"]
    ev = result["eval"]["fcn_baseline"]
    lines += ["", "| check | result |", "|---|---|",
              f"| fit data wait (fcn_baseline, no device_augment) | {fit['data_wait_fraction']:.3f} of the step time "
              f"at {fit['img_s']:.1f} img/s |",
              f"| fit data wait with data.device_augment=true | {dev['data_wait_fraction']:.3f} of the step time "
              f"at {dev['img_s']:.1f} img/s |",
              f"| host syncs per training step | {result['syncs']['per_step']:.2f} ({result['syncs']['method']}) |",
              "| eval img/s by batch size (fcn_baseline) | " + ", ".join(f"{k}: {v:.1f}" for k, v in ev.items()) + " |",
              f"| deterministic resume bit-identical | {result['resume']['bit_identical']} "
              f"(max abs diff {result['resume']['max_abs_diff']:.3g}) |",
              f"| check time | {result['seconds']:.0f} s |"]
    return "\n".join(lines)
