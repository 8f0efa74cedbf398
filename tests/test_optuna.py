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
def test_two_processes_on_one_journal_run_n_trials_in_all(tmp_path, synthetic_root):
    """Two searches started together on one journal file (as two nodes on a shared file system would), with
    hydra.sweeper.n_trials=3: 3 trials in the study (not 3 per process), numbered 0-2 without a clash, each in its
    own job directory, all complete; each process samples with its own seed; no callback warning."""
    import optuna

    from segvoc.runs.optuna_study import OWNER_ATTR
    from segvoc.runs.optuna_workers import SEED_ATTR

    storage = f"journal:{tmp_path}/study.journal"
    cmd = [sys.executable, "-m", *_search(synthetic_root, tmp_path / "out", "hydra.sweeper.n_trials=3",
                                          "hydra/sweeper/sampler=random", f"hydra.sweeper.storage={storage}",
                                          f"hydra.sweep.dir={tmp_path}/opt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=1200) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        assert "HydraConfig was not set" not in err and "raised" not in err, err[-3000:]
    study = _study(storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    jobs = sorted(p.name for p in (tmp_path / "opt").iterdir() if (p / "metrics.json").is_file())
    assert jobs == [f"{n}_fcn_baseline" for n in range(3)]
    seeds = {t.user_attrs[OWNER_ATTR]: set() for t in study.trials}
    for t in study.trials:
        seeds[t.user_attrs[OWNER_ATTR]].add(t.user_attrs[SEED_ATTR])
    assert all(len(s) == 1 for s in seeds.values()) and len(set.union(*seeds.values())) == len(seeds), seeds
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3


# --- several workers on one study, in real processes forked from this one (no training: a quick objective) -------

@pytest.fixture()
def hydra_config_kept():
    """Put back this process's HydraConfig after a test that sets or clears it."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = before


def _composed(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("train", ["hparams_search=optuna", f"paths.output_root={tmp_path}/out", *overrides],
                       return_hydra_config=True)


_BARRIER = None  # a multiprocessing.Barrier for the processes _together forks


def _together(*targets, hold: Path | None = None) -> list[int | None]:
    """Run each target in a process forked from this one; their exit codes. ``hold``: a study's trials lock, held
    by this process until every target waits for it (read from /proc/locks), then released, so that they all
    reach their first ask before any of them asks; else the targets may wait on ``_BARRIER`` to start together."""
    import fcntl
    import multiprocessing
    import time

    global _BARRIER
    ctx = multiprocessing.get_context("fork")
    _BARRIER = ctx.Barrier(len(targets))
    held = os.open(hold, os.O_RDWR | os.O_CREAT, 0o666) if hold else None

    def run(target) -> None:
        if held is not None:
            os.close(held)  # this process's copy: else the lock stays held for as long as this process runs
        target()

    procs = [ctx.Process(target=run, args=(target,)) for target in targets]
    try:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
        for p in procs:
            p.start()
        if held is not None:
            deadline = time.monotonic() + 180
            while _lock_waiters(hold) < len(targets):
                assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "never waited for the lock"
                time.sleep(0.05)
            os.close(held)
            held = None
        for p in procs:
            p.join(timeout=300)
    finally:
        if held is not None:
            os.close(held)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs]


def _lock_waiters(path: Path) -> int:
    """How many processes wait for the flock on ``path`` (Linux: blocked requests are listed with "->")."""
    inode = os.stat(path).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum("->" in line.split() and line.split()[-3].endswith(f":{inode}") for line in lines)


def _quick_search(argv: list[str]) -> None:
    """``python -m segvoc.train <argv>`` in this (forked) process, with a training that takes 0.2 s: it writes
    metrics.json and scores val mIoU = the trial's learning rate."""
    import time

    from hydra.core.global_hydra import GlobalHydra

    import segvoc.train

    def train(cfg):
        time.sleep(0.2)
        metrics = {"val": {"miou": float(cfg.optimizer.lr)}}
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    GlobalHydra.instance().clear()
    segvoc.train.train = train
    sys.argv = ["segvoc.train", *argv]
    os.environ["HYDRA_MAIN_MODULE"] = "__main__"  # conf/ relative to segvoc/train.py, as under `python -m`
    segvoc.train.main()


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks processes")
def test_two_workers_started_at_once_take_n_trials_in_all_each_with_its_own_seed(tmp_path):
    """Two sweepers on one journal with n_trials=4 and the random sampler, both held at their first ask until both
    are there: 4 trials, not 8; every trial records its worker's seed, one per worker and different between them,
    so no point is drawn twice."""
    import optuna

    import segvoc.train  # noqa: F401 - imported here once, not in each forked process
    from segvoc.runs.optuna_study import OWNER_ATTR
    from segvoc.runs.optuna_workers import SEED_ATTR, trials_lock_path

    storage = f"journal:{tmp_path}/study.journal"
    argv = ["hparams_search=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=4",
            f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/opt", f"paths.output_root={tmp_path}/out"]
    lock = trials_lock_path(storage, tmp_path / "opt")
    assert _together(lambda: _quick_search(argv), lambda: _quick_search(argv), hold=lock) == [0, 0]
    study = _study(storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    seeds: dict[str, set] = {}
    for t in study.trials:
        seeds.setdefault(t.user_attrs[OWNER_ATTR], set()).add(t.user_attrs[SEED_ATTR])
    assert len(seeds) == 2 and all(len(s) == 1 for s in seeds.values()), seeds  # both worked, one seed each
    assert len(set.union(*seeds.values())) == 2, seeds
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4
    jobs = sorted(p.name for p in (tmp_path / "opt").iterdir() if (p / "metrics.json").is_file())
    assert jobs == [f"{n}_fcn_baseline" for n in range(4)]


@pytest.mark.skipif(sys.platform != "linux", reason="forks processes")
def test_two_workers_started_at_once_requeue_a_stale_trial_once(tmp_path, hydra_config_kept):
    """A trial left RUNNING by a sweeper that is gone; two launches both see it and wait for the study's lock to
    re-queue it: one fails it and queues its parameters again, the other finds that done (no second copy, no
    error)."""
    import socket

    import optuna

    from hydra_plugins.segvoc_optuna.segvoc_optuna_sweeper import search_space
    from segvoc.runs.optuna_study import OWNER_ATTR, OptunaStudy, open_storage
    from segvoc.runs.optuna_workers import RETRY_ATTR, trials_lock_path, trials_taken

    storage = f"journal:{tmp_path}/study.journal"
    cfg = _composed(tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s")
    study = optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    space, _ = search_space([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    stale = study.ask(space)
    stale.set_user_attr(OWNER_ATTR, f"{socket.gethostname()}:{_dead_pid()}")

    def start() -> None:
        OptunaStudy().on_multirun_start(cfg)

    assert _together(start, start, hold=trials_lock_path(storage, tmp_path)) == [0, 0]
    trials = _study(storage).trials
    state = optuna.trial.TrialState
    assert trials[stale.number].state == state.FAIL
    retries = [t for t in trials if t.user_attrs.get(RETRY_ATTR) == stale.number]
    assert len(trials) == 2 and len(retries) == 1, [(t.number, t.state, t.user_attrs) for t in trials]
    assert retries[0].state == state.WAITING
    assert trials_taken(trials) == 0  # the interrupted trial and its retry (not run yet) use no trial of n_trials
    again = _study(storage).ask(space)  # the next trial asked for is the retry, with the interrupted one's values
    assert again.number == retries[0].number and again.params == stale.params


def _journal_with_trials(path: Path, n: int):
    import optuna

    from segvoc.runs.optuna_study import open_storage

    study = optuna.create_study(study_name="s", storage=open_storage(f"journal:{path}"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n)
    return study


def _stock_reader(path: Path):
    """The study as plain Optuna reads it (no segvoc repair)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))


@pytest.mark.skipif(sys.platform != "linux", reason="forks processes")
def test_two_workers_open_a_torn_journal_at_once(tmp_path):
    """The journal's last record was cut short (a kill during an append). Two workers open it at the same moment
    and run trials: one drops the torn record (the journal as it was kept once, beside it), both workers' trials
    are stored, and plain Optuna reads the study."""
    import optuna

    from segvoc.runs.optuna_study import open_storage

    path = tmp_path / "study.journal"
    _journal_with_trials(path, 2)
    torn = path.read_bytes()[:-10]
    path.write_bytes(torn)

    def work() -> None:
        _BARRIER.wait(timeout=60)
        study = optuna.load_study(study_name="s", storage=open_storage(f"journal:{path}"))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    assert _together(work, work) == [0, 0]
    (copy,) = tmp_path.glob("study.journal.torn-*")
    assert copy.read_bytes() == torn
    state = optuna.trial.TrialState
    # trial 1's last record (its result) was the torn one: it reads as running, as Optuna saw it before the cut
    assert [t.state for t in _stock_reader(path).trials] == [state.COMPLETE, state.RUNNING] + [state.COMPLETE] * 4


def test_an_open_journal_drops_a_torn_tail_before_it_appends(tmp_path):
    """Another process dies half-way through an append while this one has the journal open: this one's next write
    first drops the torn record (else Optuna glues the write onto it and every later read fails)."""
    import optuna

    path = tmp_path / "study.journal"
    study = _journal_with_trials(path, 1)
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"elsewhere","study_id":0,"da')
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [t.state for t in _stock_reader(path).trials] == [optuna.trial.TrialState.COMPLETE] * 2
    (copy,) = tmp_path.glob("study.journal.torn-*")
    assert copy.read_bytes().startswith(whole) and copy.read_bytes().endswith(b'"da')


def test_a_journal_with_a_broken_record_inside_is_refused_in_one_line(tmp_path, capsys, hydra_config_kept):
    """A cut record that others follow (a torn write that was then appended to) cannot be repaired: the launch is
    refused in one line naming the journal and the fix (by the callback that starts a search, and by the sweeper
    where no callback ran), and the journal is left as it is."""
    from hydra_plugins.segvoc_optuna.segvoc_optuna_sweeper import SegvocOptunaSweeper
    from segvoc.runs.optuna_study import OptunaStudy

    path = tmp_path / "study.journal"
    _journal_with_trials(path, 2)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][: len(lines[2]) // 2]
    broken = b"\n".join(lines)
    path.write_bytes(broken)
    cfg = _composed(tmp_path, f"hydra.sweeper.storage=journal:{path}", "hydra.sweeper.study_name=s")
    sweeper = SegvocOptunaSweeper(sampler=None, pruner=None, direction="maximize", storage=f"journal:{path}",
                                  study_name="s", n_trials=1, n_jobs=1)
    sweeper.config = cfg
    capsys.readouterr()  # Optuna's own log lines from writing the journal
    for start in (lambda: OptunaStudy().on_multirun_start(cfg), lambda: sweeper.sweep([])):
        with pytest.raises(SystemExit) as exit_:
            start()
        assert exit_.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {path}: line 3 of "), err
        assert "hydra.sweeper.storage=journal:<new file>" in err[0]
        assert path.read_bytes() == broken and not list(tmp_path.glob("*.torn-*"))


def test_optuna_multirun_starts_without_a_callback_warning(tmp_path, hydra_config_kept):
    """Hydra runs the multirun callbacks before it sets HydraConfig; the study's sweep dir is named through
    ${hydra:...}: SweepSummary, which runs first, resolved it and Hydra printed its error as a UserWarning."""
    import warnings

    from hydra._internal.callbacks import Callbacks
    from hydra.core.hydra_config import HydraConfig

    cfg = _composed(tmp_path)
    HydraConfig.instance().cfg = None  # as at the start of `python -m segvoc.train hparams_search=optuna`
    callbacks = Callbacks(cfg)
    assert [type(c).__name__ for c in callbacks.callbacks] == ["Preflight", "SweepSummary", "OptunaStudy"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        callbacks.on_multirun_start(config=cfg)
    assert [str(w.message) for w in seen] == []


def test_sweep_summary_sees_a_job_that_ends_while_it_looks(tmp_path, monkeypatch):
    """Two workers share a sweep folder; one summarises while the other's last trial ends (it writes metrics.json,
    then its result goes to the study). Read the other way round (files, then the trial), the job looked unfinished
    and no longer running, and the summary failed the finished worker's sweep (seen with two workers)."""
    from segvoc.runs import sweep

    job = tmp_path / "sweep" / "5_fcn_baseline"
    (job / ".hydra").mkdir(parents=True)

    def ends_meanwhile(folder: Path) -> bool:  # while the trial is read, the job finishes
        (folder / "metrics.json").write_text("{}")
        return False

    monkeypatch.setattr(sweep, "_running_elsewhere", ends_meanwhile)
    assert sweep.summarize(tmp_path / "sweep") == {"ok": ["5_fcn_baseline"], "pruned": [], "running": [],
                                                   "failed": {}}
