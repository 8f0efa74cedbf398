"""The benchmark command runs end to end on a tiny setting and writes every documented key (no timing asserts),
and its parts measure what they say."""

from __future__ import annotations

import json

import pytest
import torch

from segvoc.bench import main

MODEL_KEYS = {"plain_train_img_s", "task_train_img_s", "ratio", "ratio_spread", "train_gflop_per_img",
              "achieved_gflop_s", "peak_mem_mb"}


@pytest.mark.slow
def test_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    main(["--models", "fcn_baseline", "resnet34_transfer", "--image-size", "32", "--batch-size", "2", "--steps", "3",
          "--warmup", "1", "--loader-batches", "2", "--fit-models", "fcn_baseline", "--fit-steps", "2",
          "--fit-batch-size", "2", "--eval-models", "fcn_baseline", "--eval-images", "2", "--eval-batch-sizes", "1",
          "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "threads", "models", "loader", "fit", "eval", "projection"} <= set(data)
    for name in ("fcn_baseline", "resnet34_transfer"):
        assert set(data["models"][name]) >= MODEL_KEYS
        assert all(v >= 0 for k, v in data["models"][name].items() if k in MODEL_KEYS)
        assert data["models"][name]["steps"] == 3
        proj = data["projection"][name]
        assert proj["workers_for_gpu"] >= 1 and proj["gpu_img_s_at_25pct_peak"] > 0
    assert {"source_size", "img_s", "workers", "img_s_per_worker", "decode_share", "img_s_decode_cache",
            "decode_cache_speedup"} <= set(data["loader"])
    assert 0 <= data["fit"]["fcn_baseline"]["data_wait_fraction"] <= 1
    assert set(data["eval"]["fcn_baseline"]) == {"1", "2"}
    assert set(data["scores"]) == {"confusion_s_per_epoch", "per_image_confusion_s_per_epoch",
                                   "boundary_iou_s_per_epoch", "ece_s_per_epoch", "bootstrap_s"}
    assert all(v > 0 for v in data["scores"].values())


def test_flop_count_of_a_frozen_encoder_step_leaves_out_its_backward():
    """resnet34_transfer's encoder is frozen: its training step costs far less than 3x its forward."""
    from segvoc.config import compose
    from segvoc.reporting.throughput import train_gflop_per_image

    frozen = compose(["model=resnet34_transfer", "model.weights=none", "paths.output_dir=/tmp"])
    trained = compose(["model=resnet34_transfer", "model.weights=none", "model.freeze_encoder=false",
                       "paths.output_dir=/tmp"])
    f, t = (train_gflop_per_image(c, 64, torch.device("cpu")) for c in (frozen, trained))
    assert f < 0.75 * t


def test_interleaved_probe_times_task_and_plain_steps_separately(tmp_path):
    """A deliberately slow plain step makes the ratio (task / plain img/s) large; a slow task step makes it small."""
    import time

    from segvoc.config import compose
    from segvoc.reporting.throughput import overhead

    cfg = compose(["model=fcn_baseline", "model.encoder_channels=[4,4,4,4,4]", "model.decoder_channels=[4,4,4,4,4]",
                   f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false", "logger=none",
                   "trainer.max_epochs=1", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0"])
    import segvoc.reporting.throughput as tp

    original = tp.PlainStep.__call__

    def slow_plain(self):
        original(self)
        time.sleep(0.05)

    tp.PlainStep.__call__ = slow_plain
    try:
        slow = overhead(cfg, 2, 32, 1, 4, torch.device("cpu"), "32-true")
    finally:
        tp.PlainStep.__call__ = original
    assert slow["ratio"] > 2  # the task step is fast, the plain one slow
