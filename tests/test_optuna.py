"""segvoc's Optuna 4 sweeper (hydra_plugins/segvoc_optuna): studies named by their definition, continued with new
points, pruning, journal storage shared by two processes at once. The study bookkeeping tests are in
test_scale.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segvoc.config import REPO_ROOT, search_definition, search_key

PARAMS = {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "loss": "choice(ce, weighted_ce)"}


def test_study_definition_leaves_out_search_parameters_and_launch_keys():
    smoke = ["hparams_search=optuna", "debug=smoke", "data=synthetic", "loss=ce", "optimizer.lr=0.001",
             "resume=auto", "hydra.sweeper.n_trials=3"]
    real = ["hparams_search=optuna", "loss=weighted_ce", "optimizer.lr=0.002"]
    d_smoke, d_real = search_definition(smoke, PARAMS), search_definition(real, PARAMS)
    assert d_smoke["overrides"] == ["data=synthetic", "debug=smoke"]  # a trial's parameters do not name it
    assert d_real["overrides"] == []
    # as a job sees them: the trial's values, Hydra's rewriting (False), one value per key (the last typed)
    job = ["optimizer.lr=0.003", "loss=ce", "hparams_search=optuna", "debug=smoke", "data=synthetic"]
    assert search_definition(job, PARAMS) == search_definition(
        ["hparams_search=optuna", "debug=smoke", "data=synthetic"], PARAMS)
    assert search_definition(["a=false", "b=1", "b=2"], {})["overrides"] == ["a=False", "b=2"]
    assert search_key(d_smoke) != search_key(d_real)  # a smoke search and a real one: two studies
    wider = {**PARAMS, "optimizer.lr": "tag(log, interval(1e-5, 1e-2))"}
    assert search_key(search_definition(real, wider)) != search_key(d_real)  # another search space


def test_sampler_and_pruner_choices_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        for sampler in ("tpe", "gp", "cmaes", "random", "grid"):
            cfg = compose("train", ["hparams_search=optuna", f"hydra/sweeper/sampler={sampler}",
                                    "hydra/sweeper/pruner=median"], return_hydra_config=True)
            assert cfg.hydra.sweeper.sampler._target_.lower().endswith(f"{sampler}sampler")
            assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _search(root: Path, out: Path, *extra: str) -> list[str]:
    return ["segvoc.train", "hparams_search=optuna", "data=synthetic", "data.synthetic=null", f"data.root={root}",
            "debug=smoke", "trainer.max_epochs=1", "data.subset=4", "data.num_workers=0",
            "trainer.enable_progress_bar=false", f"paths.output_root={out}", *extra]


def _study(storage: str):
    import optuna

    from segvoc.runs.optuna_study import open_storage

    (summary,) = optuna.get_all_study_summaries(open_storage(storage))
    return optuna.load_study(study_name=summary.study_name, storage=open_storage(storage))


@pytest.mark.slow
def test_continued_study_samples_new_points_and_studies_are_named_by_their_definition(tmp_path, synthetic_root):
    out = tmp_path / "out"
    first = _cli(*_search(synthetic_root, out, "hydra.sweeper.n_trials=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    (study_dir,) = (out / "optuna").iterdir()
    again = _cli(*_search(synthetic_root, out, "hydra.sweeper.n_trials=3"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 trials done; running 1 more" in again.stdout
    study = _study(f"sqlite:///{study_dir}/optuna.db")
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 3 and len(set(params)) == 3, params  # the continuation drew a new point
    assert study.study_name == study_dir.name and study_dir.name.startswith("fcn_baseline-")

    # another definition (here: more epochs) is another study, in its own directory
    other = _cli(*_search(synthetic_root, out, "hydra.sweeper.n_trials=1", "trainer.max_epochs=2"))
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(list((out / "optuna").iterdir())) == 2
    # continuing a study under another definition is refused in one line
    refused = _cli(*_search(synthetic_root, out, "hydra.sweeper.n_trials=4", "trainer.max_epochs=2",
                            f"hydra.sweeper.study_name={study_dir.name}"))
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip() and not line.startswith("[I ")]
    assert len(lines) == 1 and "was defined by other overrides" in lines[0], refused.stderr[-2000:]
    assert "trainer.max_epochs=2" in lines[0] and "Traceback" not in refused.stderr
    assert len(_study(f"sqlite:///{study_dir}/optuna.db").trials) == 3


@pytest.mark.slow
def test_pruned_trials_count_as_pruned_not_failed(tmp_path, synthetic_root):
    # ThresholdPruner(lower=1.1) prunes every trial at its first report (mIoU <= 1): the wiring, deterministically
    r = _cli(*_search(synthetic_root, tmp_path / "out", "hydra.sweeper.n_trials=2", "trainer.max_epochs=3",
                      "hydra/sweeper/pruner=none", "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
                      "+hydra.sweeper.pruner.lower=1.1",
                      f"hydra.sweep.dir={tmp_path}/opt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 finished, 0 failed, 2 pruned" in r.stdout
    import optuna

    study = _study(f"sqlite:///{tmp_path}/opt/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    jobs = sorted(p for p in (tmp_path / "opt").iterdir() if p.is_dir())
    for trial, job in zip(study.trials, jobs, strict=True):  # pruned at its first report: epoch 0's val mIoU
        assert list(trial.intermediate_values) == [0] and (job / "PRUNED.json").is_file()
        assert not (job / "metrics.json").exists()
    summary = json.loads((tmp_path / "opt" / "sweep_summary.json").read_text())
    assert summary["failed"] == {} and len(summary["pruned"]) == 2


@pytest.mark.slow
def test_journal_storage_shared_by_two_processes_at_once(tmp_path, synthetic_root):
    """Two searches started together on one journal file (as two nodes on a shared file system would): 4 trials,
    numbered 0-3 without a clash, each in its own job directory, all complete."""
    import optuna

    storage = f"journal:{tmp_path}/study.journal"
    cmd = [sys.executable, "-m", *_search(synthetic_root, tmp_path / "out", "hydra.sweeper.n_trials=2",
                                          f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/opt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    study = _study(storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    jobs = sorted(p.name for p in (tmp_path / "opt").iterdir() if (p / "metrics.json").is_file())
    assert jobs == [f"{n}_fcn_baseline" for n in range(4)]
