"""``python -m segvoc.demo`` (``make demo``): offline end-to-end run on the synthetic set.

Generates the synthetic VOC-format data, trains the 4a baseline, evaluates its best checkpoint with
``segvoc.evaluate``, builds the report with ``segvoc.report``, and prints the results. Each step runs the real
command-line entry point, exactly as a user would type it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from segvoc.config import REPO_ROOT

MIN_TEST_MIOU = 0.6  # an all-background predictor scores about 0.17 here


def _run(args: list[str]) -> None:
    print("$ python -m " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): python -m {' '.join(args)}")


def main(epochs: int = 15) -> None:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = REPO_ROOT / "outputs" / "demo" / stamp
    run_dir, eval_dir, report_dir = base / "train", base / "evaluate", base / "report"
    t0 = time.time()
    _run(["segvoc.train", "experiment=4a_baseline", "data=synthetic", "trainer=cpu", f"trainer.max_epochs={epochs}",
          "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}"])
    _run(["segvoc.evaluate", f"ckpt={run_dir}/checkpoints/best.ckpt", "split=test", "trainer.accelerator=cpu",
          f"hydra.run.dir={eval_dir}"])
    _run(["segvoc.report", f"sweep={run_dir}", f"hydra.run.dir={report_dir}"])
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads((eval_dir / "metrics.json").read_text())["test"]
    print(f"\n{'split':<6} {'mIoU':>7} {'pixel acc':>10}")
    for split in ("val", "test"):
        print(f"{split:<6} {trained[split]['miou']:>7.4f} {trained[split]['pixel_acc']:>10.4f}")
    print(f"evaluate (test, tta=none): mIoU {evaluated['miou']:.4f} "
          f"({'matches' if abs(evaluated['miou'] - trained['test']['miou']) < 1e-9 else 'DIFFERS FROM'} training run)")
    print(f"\nrun dir:      {run_dir}\nreport:       {report_dir}/results.md")
    print(f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir}/tb   (or: make tensorboard)")
    print(f"demo took {time.time() - t0:.0f} s")
    if trained["test"]["miou"] < MIN_TEST_MIOU:
        raise SystemExit(f"demo: test mIoU {trained['test']['miou']:.4f} is below {MIN_TEST_MIOU}")


if __name__ == "__main__":
    main()
