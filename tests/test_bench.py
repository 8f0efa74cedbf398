"""The benchmark command runs end to end on a tiny setting and writes every documented key (no timing asserts),
and its parts measure what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segvoc.bench.benchmark import main

MODEL_KEYS = {"plain_train_img_s", "task_train_img_s", "ratio", "ratio_spread", "train_gflop_per_img",
              "achieved_gflop_s", "peak_mem_mb"}


@pytest.mark.slow
def test_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    main(["--models", "fcn_baseline", "resnet34_transfer", "--image-size", "32", "--batch-size", "2", "--steps", "3",
          "--warmup", "1", "--null-steps", "2", "--loader-batches", "2", "--fit-models", "fcn_baseline",
          "--fit-steps", "2",
          "--fit-batch-size", "2", "--eval-models", "fcn_baseline", "--eval-images", "2", "--eval-batch-sizes", "1",
          "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "threads", "overhead", "models", "loader", "fit", "eval", "projection"} <= set(data)
    loader = data["loader"]
    null = data["overhead"]["null"]
    assert all(null[k] > 0 for k in ("plain_ms", "lightning_floor_ms", "segvoc_ms"))
    assert null["lightning_floor_ms"] > null["plain_ms"]  # Lightning's loop costs more than none
    assert null["steps"] == 4 * 2
    assert {"source_size", "img_s", "workers", "img_s_per_worker", "decode_share", "img_s_decode_cache",
            "decode_cache_speedup", "img_s_device_augment", "device_augment_speedup",
            "img_s_decode_cache_device_augment", "decode_cache_device_augment_speedup",
            "device_augment_cpu_ms_per_image"} <= set(loader)
    assert loader["img_s_device_augment"] > 0 and loader["device_augment_cpu_ms_per_image"] > 0
    assert loader["img_s"] > 0 and loader["img_s_per_worker"] > 0 and 0 <= loader["decode_share"] <= 1
    # FLOPs are counted, not timed: the README's figures at 320x320 (16.1 and 27.6 GFLOP per training image)
    gflop = {"fcn_baseline": 16.1, "resnet34_transfer": 27.6}
    for name in ("fcn_baseline", "resnet34_transfer"):
        row = data["models"][name]
        assert set(row) >= MODEL_KEYS and row["steps"] == 3
        assert row["plain_train_img_s"] > 0 and row["task_train_img_s"] > 0 and row["peak_mem_mb"] >= 0
        assert 0 < row["ratio"] < 10 and row["ratio_spread"] >= 0
        assert row["train_gflop_per_img"] == pytest.approx(gflop[name], abs=0.05)
        # GFLOP/s at the measured 32x32 size: img/s x GFLOP per image scaled from 320x320 by the pixel count
        assert row["achieved_gflop_s"] == pytest.approx(row["task_train_img_s"] * gflop[name] / 100, rel=5e-3)
        proj = data["projection"][name]
        assert proj["gpu_img_s_at_25pct_peak"] == pytest.approx(0.25 * 989.4e12 / (row["train_gflop_per_img"] * 1e9))
        assert proj["workers_for_gpu"] == math.ceil(proj["gpu_img_s_at_25pct_peak"] / loader["img_s_per_worker"])
        assert proj["workers_for_gpu_device_augment"] == math.ceil(
            proj["gpu_img_s_at_25pct_peak"] / (loader["img_s_per_worker"] * loader["device_augment_speedup"]))
        assert proj["workers_for_gpu_decode_cache_device_augment"] >= 1
    assert 0 <= data["fit"]["fcn_baseline"]["data_wait_fraction"] <= 1
    assert set(data["eval"]["fcn_baseline"]) == {"1", "2"}
    assert set(data["scores"]) == {"confusion_s_per_epoch", "per_image_confusion_s_per_epoch",
                                   "boundary_iou_s_per_epoch", "ece_s_per_epoch", "bootstrap_s"}
    assert all(v > 0 for v in data["scores"].values())


def test_flop_count_of_a_frozen_encoder_step_leaves_out_its_backward():
    """resnet34_transfer's encoder is frozen: its training step costs far less than 3x its forward."""
    from segvoc.bench.throughput import train_gflop_per_image
    from segvoc.config import compose

    frozen = compose(["model=resnet34_transfer", "model.weights=none", "paths.output_dir=/tmp"])
    trained = compose(["model=resnet34_transfer", "model.weights=none", "model.freeze_encoder=false",
                       "paths.output_dir=/tmp"])
    f, t = (train_gflop_per_image(c, 64, torch.device("cpu")) for c in (frozen, trained))
    assert f < 0.75 * t


def test_interleaved_probe_times_task_and_plain_steps_separately(tmp_path):
    """A deliberately slow plain step makes the ratio (task / plain img/s) large; a slow task step makes it small."""
    import time

    from segvoc.bench.throughput import overhead
    from segvoc.config import compose

    cfg = compose(["model=fcn_baseline", "model.encoder_channels=[4,4,4,4,4]", "model.decoder_channels=[4,4,4,4,4]",
                   f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false", "logger=none",
                   "trainer.max_epochs=1", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0"])
    import segvoc.bench.throughput as tp

    original = tp.PlainStep.__call__

    def slow_plain(self):
        original(self)
        time.sleep(0.25)  # far above a task step even on a loaded 2-core machine (about 30 ms seen there)

    tp.PlainStep.__call__ = slow_plain
    try:
        slow = overhead(cfg, 2, 32, 1, 4, torch.device("cpu"), "32-true")
    finally:
        tp.PlainStep.__call__ = original
    assert slow["ratio"] > 2  # the task step is fast, the plain one slow


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section(tmp_path, capsys):
    """``--gpu-check --dry-run``: every section of the GPU check on the CPU at tiny sizes, the JSON and the table; the
    deterministic resume check leaves the process's flags as it found them (Lightning turns determinism on)."""
    out = tmp_path / "gpu_check.json"
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        main(["--gpu-check", "--dry-run", "--models", "fcn_baseline", "--gpu-check-json", str(out)])
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(det)
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["card"].startswith("cpu")
    row = data["models"]["fcn_baseline"]
    assert row["eager_img_s"] > 0 and row["compiled_img_s"] > 0 and row["train_gflop_per_img"] > 0
    assert 0 <= data["fit"]["without_device_augment"]["data_wait_fraction"] <= 1
    assert 0 <= data["fit"]["with_device_augment"]["data_wait_fraction"] <= 1
    assert data["syncs"]["per_step"] == 0, data["syncs"]
    assert set(data["eval"]["fcn_baseline"]) == {"1", "2"}
    assert data["resume"]["bit_identical"], data["resume"]
    table = capsys.readouterr().out
    assert "| fcn_baseline |" in table and "deterministic resume bit-identical | True" in table
    assert "| fit data wait with data.device_augment=true | 0." in table


def test_bf16_peak_by_card_name():
    from segvoc.bench.gpu_check import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA H200") == bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0 and bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("Tesla V100-SXM2-16GB") is None and bf16_peak_tflops("cpu") is None
