"""The benchmark command runs end to end on a tiny setting and writes every documented key (no timing asserts)."""

from __future__ import annotations

import json

from segvoc.bench import main

MODEL_KEYS = {"plain_train_img_s", "task_train_img_s", "ratio", "eval_img_s", "train_gflop_per_img",
              "achieved_gflop_s", "peak_mem_mb"}


def test_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    main(["--models", "fcn_baseline", "resnet34_transfer", "--image-size", "32", "--batch-size", "2", "--steps", "2",
          "--warmup", "1", "--sizes", "32", "64", "--loader-batches", "2", "--workers", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "threads", "models", "loader", "scaling"} <= set(data)
    for name in ("fcn_baseline", "resnet34_transfer"):
        assert set(data["models"][name]) >= MODEL_KEYS
        assert all(v > 0 for k, v in data["models"][name].items() if k in MODEL_KEYS)
        assert set(data["scaling"][name]) == {"32", "64"}
    assert {"img_s", "workers", "model_img_s", "headroom"} <= set(data["loader"])
    # the frozen encoder is not differentiated: a train step costs well under 3x an eval step in FLOPs
    assert data["models"]["resnet34_transfer"]["frozen_train_over_eval_flop"] < 2.5
