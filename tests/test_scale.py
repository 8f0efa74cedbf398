"""Scale-out paths on CPU: DDP (gloo) with exact metrics, submitit's local launcher, Optuna, failing sweep jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segvoc.config import REPO_ROOT

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests are run on Linux"),
              pytest.mark.slow]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _smoke(root: Path) -> list[str]:
    return ["data=synthetic", "data.synthetic=null", f"data.root={root}", "debug=smoke", "trainer.max_epochs=1",
            "data.subset=5", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_root) -> Path:
    """A 2-process CPU DDP training run (gloo)."""
    out = tmp_path_factory.mktemp("ddp")
    r = _cli("segvoc.train", *_smoke(synthetic_root), "trainer=ddp_cpu", "trainer.max_epochs=1",
             "trainer.log_every_n_steps=1", "data.image_size=64", "data.num_workers=0", "data.batch_size=2",
             f"hydra.run.dir={out}/run", f"paths.output_root={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_ddp_training_writes_one_run_directory(ddp_run):
    assert [p.name for p in ddp_run.iterdir()] == ["run"]
    run = ddp_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test"]["miou"] <= 1
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) >= 1


def test_ddp_evaluate_equals_single_process_on_odd_split(ddp_run, tmp_path):
    ckpt = ddp_run / "run" / "checkpoints" / "best.ckpt"
    # subset=5 -> val and test hold 5 images each: an odd count, so DistributedSampler would pad one
    res = {}
    for devices in (1, 2):
        r = _cli("segvoc.evaluate", f"ckpt={ckpt}", "split=val", "trainer=ddp_cpu", f"trainer.devices={devices}",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/d{devices}")
        assert r.returncode == 0, r.stderr[-3000:]
        res[devices] = json.loads((tmp_path / f"d{devices}" / "metrics.json").read_text())["val"]
        assert len((ddp_run / "run" / "splits" / "val.txt").read_text().split()) == 5
    one, two = res[1], res[2]
    for key in ("miou", "pixel_acc", "mean_class_acc", "per_class_iou", "epoch"):
        assert one[key] == two[key], key
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    c1 = json.loads((tmp_path / "d1" / "confusion.json").read_text())
    c2 = json.loads((tmp_path / "d2" / "confusion.json").read_text())
    assert c1 == c2  # every pixel counted exactly once


def test_submitit_local_launcher_runs_two_jobs(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "-m", "hydra/launcher=local", "loss=ce,weighted_ce", *_smoke(synthetic_root),
             "data.image_size=64", "data.num_workers=0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # really went through submitit


def test_optuna_search_two_trials(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.sampler.n_startup_trials=2", *_smoke(synthetic_root), "data.image_size=64",
             "data.num_workers=0", f"hydra.sweep.dir={tmp_path}/opt")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = [p for p in (tmp_path / "opt").iterdir() if p.is_dir() and (p / "metrics.json").is_file()]
    assert len(jobs) == 2
    best = (tmp_path / "opt" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best


def test_failing_job_does_not_stop_the_sweep_but_fails_it(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "-m", "optimizer.lr=1e30,1e-3", *_smoke(synthetic_root), "data.image_size=64",
             "trainer.log_every_n_steps=1", "trainer.max_epochs=3", f"hydra.sweep.dir={tmp_path}/sw")
    assert r.returncode == 1, r.stderr[-2000:]  # the other job ran, and the sweep as a whole failed
    summary = json.loads((tmp_path / "sw" / "sweep_summary.json").read_text())
    assert summary["ok"] and len(summary["failed"]) == 1
    (failed_job, why), = summary["failed"].items()
    assert failed_job.startswith("0_") and "NaN/inf" in why
    assert f"FAILED {failed_job}" in r.stdout


def test_sweep_where_every_job_fails_exits_nonzero(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "-m", "optimizer.lr=1e30,1e31", *_smoke(synthetic_root), "data.image_size=64",
             "trainer.log_every_n_steps=1", "trainer.max_epochs=3", f"hydra.sweep.dir={tmp_path}/sw")
    assert r.returncode == 1
    assert "0 finished, 2 failed" in r.stdout


@pytest.mark.parametrize("sig", [15, 2])  # SIGTERM, SIGINT
def test_interrupt_stops_the_whole_sweep(tmp_path, synthetic_root, sig):
    """An interrupted job is not a failed job: the sweep stops (non-zero) instead of starting the next job."""
    r = _cli("segvoc.train", "-m", "loss=ce,weighted_ce", *_smoke(synthetic_root), "trainer.max_epochs=2",
             "data.batch_size=2", "+callbacks.signal_at._target_=tests.helpers.SignalAt",
             "+callbacks.signal_at.step=1", f"+callbacks.signal_at.sig={sig}", f"hydra.sweep.dir={tmp_path}/sw")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sweep stopped" in r.stderr and "resume=" in r.stderr
    jobs = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_fcn_baseline"]  # the second job never started
    job = tmp_path / "sw" / jobs[0]
    assert not (job / "FAILED.json").exists() and (job / "checkpoints" / "last.ckpt").is_file()
