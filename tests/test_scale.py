"""Scale-out paths on CPU: DDP (gloo) with exact metrics, submitit's local launcher, Optuna, failing sweep jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segvoc.config import REPO_ROOT

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests are run on Linux"),
              pytest.mark.slow]


def _cli(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _smoke(root: Path) -> list[str]:
    return ["data=synthetic", "data.synthetic=null", f"data.root={root}", "debug=smoke", "trainer.max_epochs=1",
            "data.subset=5", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_root) -> Path:
    """A 2-process CPU DDP training run (gloo), launched with overwrite=true and a weighted loss: rank 0 writes the
    splits and the class weights before Lightning starts rank 1, which must follow rank 0's decision, not clear the
    directory again (safety issue, item 3)."""
    out = tmp_path_factory.mktemp("ddp")
    r = _cli("segvoc.train", *_smoke(synthetic_root), "trainer=ddp_cpu", "trainer.max_epochs=1",
             "trainer.log_every_n_steps=1", "data.image_size=64", "data.num_workers=0", "data.batch_size=2",
             "overwrite=true", "loss=weighted_ce", f"hydra.run.dir={out}/run", f"paths.output_root={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_ddp_training_writes_one_run_directory(ddp_run, synthetic_root, tmp_path):
    """The 2-process run against a 1-process run of the same command. Equal: the splits, the images of an epoch
    (each rank takes every 2nd of the same permutation, padded by wrapping) and, given the same weights, the
    evaluation: training's own metrics.json equals a 1-process evaluate of its checkpoint. Not equal: the steps
    (5 images, batch 2 per process: 2 steps of 2 in one process, 1 step of 2 x 2 under DDP), so the weights."""
    import torch

    # one run directory (and paths.cache_dir, where loss=weighted_ce keeps its class-pixel counts)
    assert sorted(p.name for p in ddp_run.iterdir()) == ["cache", "run"]
    run = ddp_run / "run"
    # what rank 0 wrote before rank 1 started is still there: rank 1 decided nothing and deleted nothing
    assert (run / "class_weights.json").is_file() and (run / "splits" / "train.txt").is_file()
    assert json.loads((run / ".segvoc-launch.json").read_text())["action"] == "start"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) >= 1
    single = tmp_path / "single"
    r = _cli("segvoc.train", *_smoke(synthetic_root), "trainer=cpu", "trainer.max_epochs=1",
             "trainer.log_every_n_steps=1", "data.image_size=64", "data.num_workers=0", "data.batch_size=2",
             "loss=weighted_ce", f"hydra.run.dir={single}", f"paths.output_root={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    for split in ("train", "val", "test"):
        assert (run / "splits" / f"{split}.txt").read_text() == (single / "splits" / f"{split}.txt").read_text()
    n_train = len((run / "splits" / "train.txt").read_text().split())
    steps = {name: torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
             for name, d in (("ddp", run), ("single", single))}
    assert n_train == 5 and steps == {"ddp": (-(-n_train // 2)) // 2, "single": n_train // 2} == {"ddp": 1, "single": 2}
    r = _cli("segvoc.evaluate", f"ckpt={run}/checkpoints/best.ckpt", "split=test", "trainer=cpu",
             "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/eval")
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    for key in ("miou", "pixel_acc", "mean_class_acc", "per_class_iou", "epoch"):
        assert metrics["test"][key] == evaluated[key], key
    assert metrics["test"]["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    assert json.loads((run / "confusion.json").read_text())["test"] == \
        json.loads((tmp_path / "eval" / "confusion.json").read_text())["test"]


def test_ddp_evaluate_equals_single_process_on_odd_split(ddp_run, tmp_path):
    ckpt = ddp_run / "run" / "checkpoints" / "best.ckpt"
    # subset=5 -> val and test hold 5 images each: an odd count, so DistributedSampler would pad one
    res = {}
    for devices in (1, 2):
        # 5 images: below stats.min_images, whose n/a would leave no interval to compare; lowered here only
        r = _cli("segvoc.evaluate", f"ckpt={ckpt}", "split=val", "trainer=ddp_cpu", f"trainer.devices={devices}",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/d{devices}", "stats.min_images=1",
                 "stats.min_images_per_class=0")
        assert r.returncode == 0, r.stderr[-3000:]
        res[devices] = json.loads((tmp_path / f"d{devices}" / "metrics.json").read_text())["val"]
        assert len((ddp_run / "run" / "splits" / "val.txt").read_text().split()) == 5
    one, two = res[1], res[2]
    trained = json.loads((ddp_run / "run" / "metrics.json").read_text())["val"]  # training's own (DDP) scores
    for key in ("miou", "pixel_acc", "mean_class_acc", "per_class_iou", "epoch"):
        assert one[key] == two[key] == trained[key], key
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6) and one["loss"] == pytest.approx(trained["loss"],
                                                                                                 rel=1e-6)
    c1 = json.loads((tmp_path / "d1" / "confusion.json").read_text())
    c2 = json.loads((tmp_path / "d2" / "confusion.json").read_text())
    assert c1 == c2  # every pixel counted exactly once
    assert one["per_class_boundary_iou"] == two["per_class_boundary_iou"]
    assert one["boundary_miou"] == two["boundary_miou"]
    assert one["ece"] == pytest.approx(two["ece"], rel=1e-9)
    assert one["ci_na"] == two["ci_na"] and len(one["ci_na"]) < len(one["ci"])  # some intervals to compare
    for key, interval in one["ci"].items():
        assert (interval is None) == (two["ci"][key] is None), key
        if interval is not None:
            assert interval == pytest.approx(two["ci"][key], rel=1e-9), key
    # per-image rows gathered from both ranks to rank 0: each image once, in the split's order, exact
    ids = (ddp_run / "run" / "splits" / "val.txt").read_text().split()
    per_image = {}
    for devices in (1, 2):
        with np.load(tmp_path / f"d{devices}" / "per_image_val.npz") as f:
            per_image[devices] = {k: f[k] for k in f.files}
        assert per_image[devices]["ids"].tolist() == ids
        assert per_image[devices]["confusion"].sum(0).tolist() == c2["val"]
    for key in ("confusion", "boundary"):
        assert np.array_equal(per_image[1][key], per_image[2][key]), key
    assert np.allclose(per_image[1]["calibration"], per_image[2]["calibration"], rtol=1e-9)


def test_submitit_local_launcher_runs_two_jobs(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "-m", "hydra/launcher=local", "loss=ce,weighted_ce", *_smoke(synthetic_root),
             "data.image_size=64", "data.num_workers=0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # really went through submitit


def test_optuna_study_is_stored_and_continued_to_n_trials_in_total(tmp_path, synthetic_root):
    def search(n: int) -> subprocess.CompletedProcess:
        r = _cli("segvoc.train", "hparams_search=optuna", f"hydra.sweeper.n_trials={n}",
                 "hydra.sweeper.sampler.n_startup_trials=2", *_smoke(synthetic_root), "data.image_size=64",
                 "data.num_workers=0", f"hydra.sweep.dir={tmp_path}/opt")
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    search(2)
    assert (tmp_path / "opt" / "optuna.db").is_file()  # SQLite in the sweep directory
    second = search(3)
    assert "2 of 3 trials done; running 1 more" in second.stdout
    jobs = sorted(p.name for p in _jobs(tmp_path / "opt") if (p / "metrics.json").is_file())
    assert jobs == ["0_fcn_baseline", "1_fcn_baseline", "2_fcn_baseline"]  # new jobs numbered after the old
    import yaml

    best = yaml.safe_load((tmp_path / "opt" / "optuna_best.yaml").read_text())
    assert best["trials_complete"] == 3 and "optimizer.lr" in best["best_params"]
    assert f"optuna best: trial {best['best_trial']}" in second.stdout
    values = [json.loads((tmp_path / "opt" / j / "metrics.json").read_text())["val"]["miou"] for j in jobs]
    assert best["best_value"] == pytest.approx(max(values))
    third = search(3)
    assert "running 0 more" in third.stdout and len(_jobs(tmp_path / "opt")) == 3


def test_failing_job_does_not_stop_the_sweep_but_fails_it(tmp_path, synthetic_root):
    r = _cli("segvoc.train", "-m", "optimizer.lr=1e30,1e-3", *_smoke(synthetic_root), "data.image_size=64",
             "trainer.log_every_n_steps=1", "trainer.max_epochs=3", f"hydra.sweep.dir={tmp_path}/sw")
    assert r.returncode == 1, r.stderr[-2000:]  # the other job ran, and the sweep as a whole failed
    summary = json.loads((tmp_path / "sw" / "sweep_summary.json").read_text())
    assert summary["ok"] and len(summary["failed"]) == 1
    (failed_job, why), = summary["failed"].items()
    # lr=1e30 is refused by its rule when the job starts (before the job writes anything but its failure record)
    assert failed_job.startswith("0_") and why.startswith("ConfigError: optimizer.lr=1e+30: must be"), why
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
    assert len(jobs) == 1 and jobs[0].startswith("0_fcn_baseline_") and "__loss-ce__" in jobs[0]  # 2nd never started
    job = tmp_path / "sw" / jobs[0]
    assert not (job / "FAILED.json").exists() and (job / "checkpoints" / "last.ckpt").is_file()


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _same_run(a: Path, b: Path) -> None:
    import torch

    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    sa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert sa["global_step"] == sb["global_step"]
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])


REQUEUE = ["hydra/launcher=local", "data.batch_size=1", "data.num_workers=0", "data.image_size=64"]


def test_submitit_requeue_signal_saves_requeues_and_continues_exactly(tmp_path, synthetic_root):
    """SIGUSR2 (what SLURM sends before the time limit / on pre-emption, via submitit) in the middle of an epoch:
    the job saves at the batch boundary, submitit requeues it, and the requeued job continues the same run
    directory to the weights and metrics of an uninterrupted run."""
    ref = _cli("segvoc.train", "-m", *REQUEUE, *_smoke(synthetic_root), "trainer.max_epochs=3",
               f"hydra.sweep.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    r = _cli("segvoc.train", "-m", *REQUEUE, *_smoke(synthetic_root), "trainer.max_epochs=3",
             "+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=7",
             "+callbacks.signal_at.sig=12", f"hydra.sweep.dir={tmp_path}/rq")
    assert r.returncode == 0, r.stderr[-3000:]
    log = "".join(p.read_text() for p in (tmp_path / "rq" / ".submitit").rglob("*_log.*"))
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log  # submitit's own requeue
    assert re.search(r"interrupted at step \d+: saved .*last\.ckpt \(batch \d of epoch 1\)", log)  # exact, first
    assert "resuming the unfinished run" in log                     # resume=auto in the requeued job
    (job,) = _jobs(tmp_path / "rq")
    _same_run(job, _jobs(tmp_path / "ref")[0])


def test_killed_sweep_rerun_skips_finished_and_resumes_the_rest(tmp_path, synthetic_root):
    """SIGKILL in the middle of the second job; the same command again skips job 0, resumes job 1 from its
    last.ckpt, and every job ends as in an uninterrupted sweep. overwrite=true runs everything again."""
    sweep = ["-m", "seed=1,2", *_smoke(synthetic_root), "trainer.max_epochs=2", "data.batch_size=2",
             "data.image_size=64", "data.num_workers=0"]
    ref = _cli("segvoc.train", *sweep, f"hydra.sweep.dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    kill = ["+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=4",
            "+callbacks.signal_at.sig=9", "+callbacks.signal_at.job=1"]
    first = _cli("segvoc.train", *sweep, *kill, f"hydra.sweep.dir={tmp_path}/sw")
    assert first.returncode == -9
    job0, job1 = _jobs(tmp_path / "sw")
    assert (job0 / "metrics.json").is_file() and not (job1 / "metrics.json").exists()
    assert (job1 / "checkpoints" / "last.ckpt").is_file()
    again = _cli("segvoc.train", *sweep, *kill, f"hydra.sweep.dir={tmp_path}/sw")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipped, finished: {job0}" in again.stdout
    assert "2 finished, 0 failed" in again.stdout
    for mine, theirs in zip(_jobs(tmp_path / "sw"), _jobs(tmp_path / "ref"), strict=True):
        _same_run(mine, theirs)
    before = (job0 / "metrics.json").stat().st_mtime_ns
    # the same command (the job folders are named by its overrides), with the kill switched off
    over = _cli("segvoc.train", *sweep, *kill, "overwrite=true", f"hydra.sweep.dir={tmp_path}/sw",
                env={"SIGNAL_AT_OFF": "1"})
    assert over.returncode == 0, over.stderr[-3000:]
    assert "skipped" not in over.stdout and (job0 / "metrics.json").stat().st_mtime_ns > before
    assert "overwrite=true" in (job0 / ".hydra" / "overrides.yaml").read_text().lower()  # this launch: .hydra/
    _same_run(job0, _jobs(tmp_path / "ref")[0])
