"""Files others can read, launches that never collide, sweep bookkeeping and one-line errors (issue 24: 5, 6, 10)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from segvoc.app import run_app
from segvoc.config import CONF_DIR
from segvoc.errors import WeightsError
from segvoc.train import train


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Umask:
    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        self.old = os.umask(self.mask)

    def __exit__(self, *exc: object) -> None:
        os.umask(self.old)


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_take_the_umask_mode(tmp_path, umask, expected):
    """``mkstemp`` makes 0600 files; an atomic write must give what ``open(path, "w")`` gives under the umask."""
    from segvoc.data.synthetic import generate
    from segvoc.utils import atomic_write, write_json

    with _Umask(umask):
        write_json(tmp_path / "m.json", {"a": 1})
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"), binary=True)
        plain = tmp_path / "plain.txt"
        plain.write_text("reference")
        voc = generate(tmp_path / "syn", num_train=2, num_val=2, height=20, width=24, seed=0)
    assert _mode(plain) == expected
    assert _mode(tmp_path / "m.json") == _mode(tmp_path / "b.bin") == expected
    # a generated tree in the shared cache: its folder (made with mkdtemp, 0700) and files are readable too
    assert _mode(tmp_path / "syn") == 0o777 & ~umask
    assert _mode(next((voc / "JPEGImages").iterdir())) == expected


@pytest.fixture(scope="module")
def run_under_umask_027(tmp_path_factory, synthetic_root) -> Path:
    """One weighted smoke run (class counts cached in paths.cache_dir) trained under umask 027."""
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("run027")
    cfg = make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=6",
                   "trainer.max_epochs=2", "loss.class_weights=median_frequency",
                   f"paths.cache_dir={out}/cache", data_root=synthetic_root)
    with _Umask(0o027):
        train(cfg)
    return out


def test_run_files_and_shared_cache_are_group_readable(run_under_umask_027):
    run = run_under_umask_027
    files = [run / "metrics.json", run / "confusion.json", run / "MODEL_CARD.md", run / "class_weights.json",
             run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt", *(run / "cache").glob("*.json")]
    assert len(files) == 7
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o640) for f in files}


def test_best_checkpoint_holds_weights_and_config_last_the_full_state(run_under_umask_027, tmp_path):
    """best.ckpt: what scoring and export need, no optimizer state; last.ckpt: everything resume needs."""
    from segvoc.engine.builders import load_task

    best = torch.load(run_under_umask_027 / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run_under_umask_027 / "checkpoints" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and "lr_schedulers" not in best
    assert "optimizer_states" in last and "lr_schedulers" in last and "callbacks" in last
    assert "cfg" in best["hyper_parameters"] and isinstance(best["epoch"], int)
    weights = json.loads((run_under_umask_027 / "class_weights.json").read_text())["weights"]
    assert best["state_dict"]["criterion.weight"].tolist() == pytest.approx(weights)
    task, _ = load_task(run_under_umask_027 / "checkpoints" / "best.ckpt")  # what evaluate/export/report call
    assert task.criterion.class_weight.tolist() == pytest.approx(weights)
    size_best = (run_under_umask_027 / "checkpoints" / "best.ckpt").stat().st_size
    size_last = (run_under_umask_027 / "checkpoints" / "last.ckpt").stat().st_size
    print(f"CKPT SIZES best {size_best} B, last {size_last} B")
    assert size_best < 0.6 * size_last


def test_weights_only_checkpoint_as_ckpt_path_is_one_line(run_under_umask_027, smoke_cfg, tmp_path, capsys):
    cfg = smoke_cfg(f"paths.output_dir={tmp_path / 'new'}",
                    f"ckpt_path={run_under_umask_027 / 'checkpoints' / 'best.ckpt'}")
    with pytest.raises(SystemExit) as exc:
        run_app(train, cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ckpt_path=") and "weights only" in err and "last.ckpt" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_ckpt_path_typo_is_one_line_exit_2(smoke_cfg, tmp_path, capsys):
    typo = tmp_path / "runs" / "lats.ckpt"
    with pytest.raises(SystemExit) as exc:
        run_app(train, smoke_cfg(f"paths.output_dir={tmp_path / 'new'}", f"ckpt_path={typo}"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: ckpt_path={typo}: checkpoint not found; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
    assert not (tmp_path / "new").exists()


def test_truncated_checkpoint_message_keeps_whole_words(tmp_path):
    from segvoc.engine.checkpoint import read_checkpoint

    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:100])  # torch's cause is a 330-character paragraph
    with pytest.raises(WeightsError) as exc:
        read_checkpoint(cut)
    try:
        torch.load(cut, weights_only=True)
    except Exception as cause:  # noqa: BLE001 - the cause the message must carry
        words = str(cause).split()
    message = str(exc.value)
    assert "\n" not in message
    inner = message.split("(RuntimeError: ", 1)[1].rsplit("); is it a segvoc checkpoint", 1)[0]
    shown = inner.removesuffix(" …").split()
    assert shown == words[: len(shown)]  # every word shown is a whole word of the cause, in order
    assert "internal miniz error." in inner  # more than the 100 characters that used to be kept


def _run_dir(config_name: str, tmp_path: Path, *overrides: str) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, return_hydra_config=True,
                            overrides=[f"paths.output_root={tmp_path}", *overrides])
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_two_launches_in_one_second_get_their_own_directories(command, tmp_path):
    """Each launch composes its own config; the directory carries the same per-launch id as ``train``'s."""
    extra = ["ckpt=x"] + (["input=y"] if command == "predict" else [])
    first, second = (_run_dir(command, tmp_path, *extra) for _ in range(2))
    assert first.startswith(f"{tmp_path}/{command}/") and second.startswith(f"{tmp_path}/{command}/")
    ids = [re.fullmatch(r"\d\d-\d\d-\d\d_([0-9a-f]{6})", Path(d).name) for d in (first, second)]
    assert all(ids), (first, second)  # <time>_<run id>, as train's directories
    assert ids[0].group(1) != ids[1].group(1)  # distinct ids, not only a second that ticked


def test_export_temporary_names_are_unique(tmp_path, monkeypatch):
    """Two exports to the same file write different temporary files (one never replaces the other's half)."""
    from segvoc.config import compose
    from segvoc.deploy import exporting
    from segvoc.engine.builders import build_task

    seen: list[str] = []
    real = torch.jit.save

    def spy(module, path, *args, **kwargs):
        seen.append(str(path))
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "save", spy)
    task = build_task(compose(["model=fcn_baseline", f"paths.output_dir={tmp_path}"]), pretrained=False).eval()
    target = tmp_path / "model.pt"
    for _ in range(2):
        exporting.export(task, target, "torchscript", {"k": 1})
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(Path(p).parent == tmp_path and Path(p).name.startswith(".model.") and Path(p).suffix == ".pt"
               for p in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


def test_sweep_summary_counts_a_launch_caught_half_way_as_running(tmp_path):
    """Two processes sharing a sweep folder (an Optuna journal study on two nodes): when one finishes, the other
    may be writing a job's ``.hydra/`` files (config.yaml, hydra.yaml, then overrides.yaml). That job is running,
    not failed; the summary counted it failed and the finished process exited 1 (seen in a full test run)."""
    from segvoc.runs.sweep import summarize

    sweep = tmp_path / "sweep"
    for job, files in (("0_a", ["config.yaml"]), ("1_a", ["config.yaml", "hydra.yaml"]),
                       ("2_a", ["config.yaml", "hydra.yaml", "overrides.yaml"])):
        (sweep / job / ".hydra").mkdir(parents=True)
        for name in files:
            OmegaConf.save(OmegaConf.create({"hydra": {"job": {"env_set": {}}}} if name == "hydra.yaml" else []),
                           sweep / job / ".hydra" / name)
    (sweep / "1_a" / ".hydra" / "hydra.yaml").write_text("hydra:\n  job: {env_set: {SEGVOC_")  # half-written
    summary = summarize(sweep)
    assert summary["running"] == ["0_a", "1_a"]
    assert summary["failed"] == {"2_a": "no metrics.json (killed or still running?)"}  # launched, never finished


@pytest.mark.slow
def test_failed_sweep_job_counts_as_finished_once_it_runs_again(smoke_cfg, tmp_path):
    """A job that failed after writing last.ckpt (FAILED.json beside it) and is rerun (resume=auto) is no
    longer listed as failed."""
    from segvoc.config import command_line_overrides
    from segvoc.runs.sweep import FAILED_MARKER, summarize

    job = tmp_path / "sweep" / "0_fcn_baseline"
    cfg = smoke_cfg(f"paths.output_dir={job}", "trainer.max_epochs=1")
    train(cfg)
    # what a command saves of the job's launch (segvoc writes .hydra/ itself, once the folder is its run's)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(command_line_overrides()), job / ".hydra" / "overrides.yaml")
    for name in ("metrics.json", ".segvoc-finished.json"):  # as if the job had died after its checkpoint
        (job / name).unlink()
    (job / FAILED_MARKER).write_text(json.dumps({"error": "DatasetError: broken file"}))
    assert summarize(tmp_path / "sweep")["failed"] == {"0_fcn_baseline": "DatasetError: broken file"}
    train(smoke_cfg(f"paths.output_dir={job}", "trainer.max_epochs=1", "resume=auto"))
    assert summarize(tmp_path / "sweep") == {"ok": ["0_fcn_baseline"], "failed": {}, "pruned": [], "running": []}


def test_tree_check_lists_every_problem_in_one_pass(voc_mini, tmp_path):
    """A listed id with no files, an id without its image, a truncated JPEG and a mask holding 50: all four in
    one report, each missing file named."""
    import shutil

    import numpy as np
    from PIL import Image

    from segvoc.data.tree_check import check_dataset

    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc_mini, root)
    with open(root / "ImageSets/Segmentation/train.txt", "a") as f:
        f.write("2007_999999\n")
    (root / "JPEGImages" / "2007_000032.jpg").unlink()
    jpg = root / "JPEGImages" / "2007_000033.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])
    mask_path = root / "SegmentationClass" / "2007_000042.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 50
    Image.fromarray(mask).save(mask_path)
    report = check_dataset({"root": tmp_path}, progress=False)
    problems = report["errors"]
    assert len(problems) == 4, problems
    by_id = {i: [p for p in problems if i in p] for i in ("999999", "000032", "000033", "000042")}
    assert all(len(v) == 1 for v in by_id.values()), by_id
    assert "no JPEGImages/2007_999999.jpg and no SegmentationClass/2007_999999.png" in by_id["999999"][0]
    assert "no JPEGImages/2007_000032.jpg (" in by_id["000032"][0] and ".png" not in by_id["000032"][0]
    assert "JPEGImages/2007_000033.jpg: " in by_id["000033"][0] and "values 50 (1 px)" in by_id["000042"][0]
    assert report["counts"][0] > 0  # the one good pair (2007_000039) was still counted


@pytest.mark.parametrize(("typed", "key"), [
    ("data.batch_size=0", "data.batch_size"), ("trainer.max_epochs=-1", "trainer.max_epochs"),
    ("optimizer.lr=0", "optimizer.lr"), ("data.num_workers=-1", "data.num_workers"), ("data.subset=0", "data.subset"),
    ("data.image_size=2.5", "data.image_size"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("data.eval_batch_size=many", "data.eval_batch_size"), ("data.test_fraction=1", "data.test_fraction"),
])
def test_bad_numbers_are_one_line_exit_2_before_any_work(typed, key, smoke_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_app(train, smoke_cfg(f"paths.output_dir={out}", typed))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}=") and "must be" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_good_numbers_of_every_preset_and_command_pass(tmp_path):
    """The checks accept every shipped configuration (they must not refuse what the project itself runs)."""
    from segvoc.config import check_values, compose

    presets = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    for preset in presets:
        for debug in ([], ["debug=smoke"], ["debug=overfit"]):
            check_values(compose([f"experiment={preset}", f"paths.output_dir={tmp_path}", *debug]))
    for extra in (["data.num_workers=auto", "data.eval_batch_size=auto", "trainer.max_epochs=null",
                   "data.subset=null", "data.test_fraction=0", "+trainer.max_steps=-1", "optimizer.lr=1e-6"],):
        check_values(compose([f"paths.output_dir={tmp_path}", *extra]))
    check_values(compose(["ckpt=x", "input=y", f"paths.output_dir={tmp_path}"], config_name="predict"))
    check_values(compose(["ckpt=x"], config_name="export"))
    check_values(compose([f"paths.output_dir={tmp_path}"], config_name="check"))


def test_evaluate_without_ckpt_is_one_line(tmp_path, capsys):
    from segvoc.config import compose
    from segvoc.evaluate import evaluate

    with pytest.raises(SystemExit) as exc:
        run_app(evaluate, compose([f"paths.output_dir={tmp_path}"], config_name="evaluate"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: ckpt is required: add ckpt=<value> to the command (see the comment on ckpt in " \
                  "conf/evaluate.yaml)"


def test_deletion_overrides_are_applied_on_resume_or_refused(run_under_umask_027):
    from segvoc.config import carry_overrides, compose
    from segvoc.errors import ConfigError
    from segvoc.runs.directory import resume_config

    run = run_under_umask_027
    stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["cfg"]
    assert "early_stopping" in stored["callbacks"]
    typed = ["~callbacks.early_stopping"]
    cfg = compose([f"resume={run}", f"paths.output_dir={run}", *typed])
    assert "early_stopping" not in resume_config(cfg, typed).callbacks
    typed = ["~loss.class_weights"]
    with pytest.raises(ConfigError, match=r"^~loss.class_weights: loss.class_weights cannot change here"):
        resume_config(compose([f"resume={run}", f"paths.output_dir={run}", *typed]), typed)
    # evaluate carries the data.* keys typed with it onto the checkpoint's config in the same way
    composed = compose([f"paths.output_dir={run}", "ckpt=x", "~data.md5"], config_name="evaluate")
    carried = carry_overrides(OmegaConf.create(stored), composed, ("data",), "no", ["~data.md5"])
    assert "md5" in stored["data"] and "md5" not in carried.data


def _finished_sweep(sweep: Path, *common: str) -> dict[str, str]:
    """A finished sweep of loss=ce,weighted_ce (and ``common``) as segvoc leaves it; returns its checksums."""
    for num, loss in enumerate(("ce", "weighted_ce")):
        job = sweep / f"{num}_fcn_baseline"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"loss={loss}", *common]), job / ".hydra" / "overrides.yaml")
        (job / "metrics.json").write_text(json.dumps({"val": {"miou": 0.5}, "test": {"miou": 0.5}}))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "sweep_summary.json").write_text(json.dumps({"ok": ["0_fcn_baseline", "1_fcn_baseline"], "failed": {}}))
    return _checksums(sweep)


def _checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _multirun_config(*overrides: str):
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return GlobalHydra.instance().hydra.compose_config(
            "train", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False)


def test_sweep_landing_on_another_sweeps_runs_is_refused_before_anything(tmp_path, capsys):
    from segvoc.runs.sweep import SweepSummary

    sweep = tmp_path / "sweep"
    before = _finished_sweep(sweep)
    with pytest.raises(SystemExit) as exc:
        SweepSummary().on_multirun_start(_multirun_config("loss=ce,focal", f"hydra.sweep.dir={sweep}"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {sweep}/1_fcn_baseline: holds a run launched with other overrides (now "
                          "['loss=focal'], then ['loss=weighted_ce'])") and len(err.splitlines()) == 1
    # the same sweep again, one that adds a job, and overwrite=true go ahead
    SweepSummary().on_multirun_start(_multirun_config("loss=ce,weighted_ce", f"hydra.sweep.dir={sweep}"))
    SweepSummary().on_multirun_start(_multirun_config("loss=ce,weighted_ce,focal", f"hydra.sweep.dir={sweep}"))
    SweepSummary().on_multirun_start(_multirun_config("loss=ce,focal", "overwrite=true", f"hydra.sweep.dir={sweep}"))
    assert _checksums(sweep) == before


@pytest.mark.slow
def test_refused_sweep_launch_changes_nothing_on_disk(tmp_path):
    """The whole command: exit 2, one line, and every file of the finished sweep as it was."""
    import subprocess
    import sys

    from segvoc.config import REPO_ROOT

    sweep = tmp_path / "sweep"
    common = [f"paths.output_root={tmp_path}/outputs", "data=synthetic", "debug=smoke"]
    before = _finished_sweep(sweep, *common)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "segvoc.train", "-m", "loss=ce,focal", f"hydra.sweep.dir={sweep}",
                           *common],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {sweep}/1_fcn_baseline: holds a run")
    assert "Traceback" not in proc.stderr
    assert _checksums(sweep) == before


def test_compiled_model_trains_compiled_and_evaluates_eager(tmp_path):
    """``perf.compile``: training steps go through Dynamo; full-resolution evaluation (many sizes) never does."""
    from segvoc.config import compose
    from segvoc.engine.builders import build_task

    compiled: list[tuple] = []

    def backend(gm, example_inputs):
        compiled.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    torch._dynamo.reset()  # graphs compiled by earlier tests in this process would be reused without our backend
    task = build_task(compose(["model=fcn_baseline", f"paths.output_dir={tmp_path}"]), pretrained=False)
    task.model.compile(backend=backend)  # in place, as perf.compile does (a counting backend instead of inductor)
    task.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for h, w in ((37, 53), (61, 45), (50, 50), (33, 71)):
            out = task.predict_log_probs(torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g))
            assert out.shape == (1, 21, h, w)
    assert compiled == []
    task.train()
    task(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g))  # a training forward
    assert len(compiled) >= 1


def test_lock_helper_takes_a_lab_mates_lock_file_without_truncating_it():
    """``segvoc.utils.file_lock`` on a lock file that belongs to someone else (0644, root's, in a folder the other
    user cannot write; not root: chmod 0444): it opens read-only, keeps the file's content, and still excludes:
    the lab mate's lock waits while this process holds it."""
    import shutil
    import time

    from segvoc.utils import file_lock
    from tests.helpers import lab_mate, shared_folder

    folder = shared_folder()
    try:
        lock = folder / "decoded_x.lock"
        lock.write_text("kept")
        if os.geteuid() != 0:
            lock.chmod(0o444)
            folder.chmod(0o555)
        body = ("print('ready', flush=True)\n"
                "with file_lock(sys.argv[1], 'paths.cache_dir'):\n"
                "    print(time.time(), flush=True)")
        with file_lock(lock, "paths.cache_dir"):
            proc = lab_mate("import time; from segvoc.utils import file_lock", body, str(lock))
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(0.5)
            released = time.time()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert float(out.split()[-1]) >= released  # it waited for this process's lock
        assert lock.read_text() == "kept"  # opened without truncating
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o002, 0o664)])
def test_lock_file_is_created_with_the_umask_mode(tmp_path, umask, expected):
    """A lock file segvoc creates gets what the umask gives (group-writable under 002, so a lab mate can open it
    read-write, as flock on NFS needs)."""
    from segvoc.utils import file_lock

    with _Umask(umask), file_lock(tmp_path / "new.lock", "paths.cache_dir"):
        pass
    assert _mode(tmp_path / "new.lock") == expected


def test_lock_that_cannot_be_created_is_one_line_naming_the_key():
    """A lock file that is missing in a folder this user cannot write: one ``ConfigError`` line naming the file and
    the key that chose the folder, not a PermissionError traceback."""
    import shutil

    from tests.helpers import lab_mate, shared_folder

    folder = shared_folder()
    try:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        body = ("try:\n"
                "    with file_lock(sys.argv[1], 'paths.cache_dir'):\n"
                "        pass\n"
                "except ConfigError as exc:\n"
                "    print(exc)")
        proc = lab_mate("from segvoc.errors import ConfigError; from segvoc.utils import file_lock", body,
                        str(folder / "x.lock"))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == (f"{folder / 'x.lock'}: cannot lock (Permission denied); make {folder} writable for "
                               "you, or set paths.cache_dir to a folder you can write")
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
