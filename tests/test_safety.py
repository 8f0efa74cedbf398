"""The safety rules on real runs and real processes: segvoc deletes only what it made (A), one launch owns a run
directory (B), a run is finished only when everything is written (C), configs read from files are data (D), and a
resumed run keeps its csv history, its best-checkpoint tracking and its early-stopping decision (I)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segvoc.config import REPO_ROOT
from tests.helpers import pin_unbeatable_best

SMOKE = ["data=synthetic", "debug=smoke", "trainer.max_epochs=1", "data.synthetic.num_train=6",
         "data.synthetic.num_val=6", "data.synthetic.height=32", "data.synthetic.width=32", "data.image_size=32",
         "trainer.enable_progress_bar=false", "logger=none"]


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _one_line_refusal(r: subprocess.CompletedProcess, start: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {start}"), lines[-3:]


@pytest.fixture()
def foreign(tmp_path: Path) -> Path:
    """A folder segvoc did not make, holding a user's files under names a run and a dataset also use."""
    home = tmp_path / "home"
    (home / "wandb").mkdir(parents=True)
    (home / "wandb" / "run.log").write_text("someone else's")
    (home / "thesis.tex").write_text("\\chapter{Results}")
    (home / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    (home / "tb").mkdir()
    return home


# ---- A: ownership -----------------------------------------------------------------------------------------------

def test_synthetic_data_never_replaces_a_folder_it_did_not_generate(foreign, tmp_path):
    """Item 1: ``data=synthetic data.root=DIR`` with a DIR segvoc did not generate is refused in one line before
    anything is written (no run directory either); DIR keeps every file."""
    before = _checksums(foreign)
    r = _cli("segvoc.train", *SMOKE, f"data.root={foreign}", f"hydra.run.dir={tmp_path / 'run'}",
             f"paths.output_root={tmp_path / 'out'}")
    _one_line_refusal(r, f"{foreign}: not a synthetic folder segvoc made")
    assert _checksums(foreign) == before
    assert not (tmp_path / "run").exists()


def test_a_generated_tree_is_replaced_when_its_settings_change(tmp_path):
    from segvoc.data.synthetic import generate
    from segvoc.safety.ownership import read_marker

    root = tmp_path / "syn"
    generate(root, num_train=2, num_val=2, height=32, width=32)
    assert read_marker(root)["kind"] == "synthetic"
    generate(root, num_train=3, num_val=2, height=32, width=32)  # other settings: segvoc's own tree is replaced
    assert len(list((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty, num_train=2, num_val=2, height=32, width=32)  # an empty folder is taken
    assert read_marker(empty)["kind"] == "synthetic"


def test_overwrite_and_auto_start_refuse_a_folder_segvoc_did_not_make(foreign, tmp_path):
    """Item 2: ``overwrite=true`` (and ``resume=auto`` on a folder without a checkpoint) in a folder that is not a
    segvoc run deletes nothing and writes nothing, not even ``.hydra/``."""
    before = _checksums(foreign)
    common = [*SMOKE, f"data.root={tmp_path / 'data'}", f"hydra.run.dir={foreign}", f"paths.output_root={tmp_path}"]
    _one_line_refusal(_cli("segvoc.train", *common, "overwrite=true"), f"{foreign}: not a run folder segvoc made")
    _one_line_refusal(_cli("segvoc.train", *common, "resume=auto"), f"{foreign}: not a run folder segvoc made")
    assert _checksums(foreign) == before


def test_overwrite_of_a_segvoc_run_clears_only_its_outputs(smoke_cfg, tmp_path):
    """In a run directory segvoc made, ``overwrite=true`` removes the run's outputs and keeps what the user added;
    a ``.last.ckpt.*.tmp`` left by a killed save is removed on the next start."""
    from segvoc.train import train

    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2"))
    (tmp_path / "notes.txt").write_text("mine")
    stale = tmp_path / "checkpoints" / ".last.ckpt.k3j2h1g0.tmp"
    stale.write_bytes(b"\0" * 1000)
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns
    earlier = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))  # an output the new run does not rewrite
    assert earlier
    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2", "overwrite=true"))
    assert (tmp_path / "notes.txt").read_text() == "mine" and not stale.exists()
    assert (tmp_path / "metrics.json").stat().st_mtime_ns > stamp
    assert not [p for p in earlier if p.exists()], "overwrite=true kept the earlier run's TensorBoard events"


# ---- B: one owner per run directory -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_launch_into_a_held_run_directory_is_refused_naming_the_holder(tmp_path, synthetic_root):
    """Two real launches into one ``hydra.run.dir``: while the first trains (held at its start), the second is
    refused in one line naming the first's PID, and writes nothing."""
    run, ready, release = tmp_path / "run", tmp_path / "ready", tmp_path / "release"
    cmd = [sys.executable, "-m", "segvoc.train", *SMOKE, "data.synthetic=null", f"data.root={synthetic_root}",
           f"hydra.run.dir={run}", f"paths.output_root={tmp_path}"]
    first = subprocess.Popen([*cmd, "+callbacks.hold._target_=tests.helpers.HoldUntil",
                              f"+callbacks.hold.ready={ready}", f"+callbacks.hold.release={release}"],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert first.poll() is None and time.time() < deadline, "the first launch ended before training"
            time.sleep(0.1)
        before = _checksums(run)
        second = _cli("segvoc.train", *SMOKE, "data.synthetic=null", f"data.root={synthetic_root}",
                      f"hydra.run.dir={run}", f"paths.output_root={tmp_path}", "resume=auto")
        _one_line_refusal(second, f"{run}: another launch is running in it (pid {first.pid} on host ")
        assert _checksums(run) == before
    finally:
        release.write_text("go")
        err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, err[-2000:]
    assert (run / "metrics.json").is_file()


def test_launches_in_one_slurm_job_get_their_own_run_ids(monkeypatch):
    """Item 5 (the rule; the real processes are in test_train's launch test): two launches of one SLURM job get
    different ids; the ranks of one multi-task ``srun`` step share theirs."""
    from segvoc.config import _run_id

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    a, b = _run_id(), _run_id()
    assert a != b and a.startswith("j4242_") and b.startswith("j4242_")
    monkeypatch.setenv("SLURM_STEP_ID", "3")  # one single-task step (srun -n1) running two launches: two runs
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert _run_id() != _run_id()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert _run_id() == _run_id() == "j4242_s3"


# ---- C: commit last ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["write_model_card", "finish_trackers"])
def test_a_run_that_died_in_its_final_phase_is_completed_not_skipped(smoke_cfg, tmp_path, monkeypatch, phase):
    """Item 6: ``metrics.json`` is written, then the run dies before ``MODEL_CARD.md`` (or after it, in the
    trackers' finish: then both files of a finished 0.4 run are there). ``resume=auto`` re-scores the best checkpoint
    and writes what is missing; only then is the run finished. A ``.last.ckpt.*.tmp`` its killed save left is
    removed when it continues."""
    import segvoc.runs.artifacts as artifacts
    from segvoc.runs.lifecycle import FINISHED
    from segvoc.train import train

    original = getattr(artifacts, phase)

    def die(*args, **kwargs):
        raise RuntimeError(f"killed in {phase}")

    monkeypatch.setattr(artifacts, phase, die)
    with pytest.raises(RuntimeError, match=f"killed in {phase}"):
        train(smoke_cfg("trainer.max_epochs=1", "data.subset=2", "resume=auto"))
    assert (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "MODEL_CARD.md").exists() == (phase == "finish_trackers")
    assert not (tmp_path / FINISHED).exists()
    stale = tmp_path / "checkpoints" / ".last.ckpt.k3j2h1g0.tmp"
    stale.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(artifacts, phase, original)
    metrics = train(smoke_cfg("trainer.max_epochs=1", "data.subset=2", "resume=auto"))
    assert (tmp_path / "MODEL_CARD.md").is_file() and (tmp_path / FINISHED).is_file()
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert not stale.exists()


# ---- D: configs read from files are data ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_root) -> Path:
    from segvoc.train import train
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("tiny")
    train(make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=2",
                   "trainer.max_epochs=1", data_root=synthetic_root))
    return out


def _crafted(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of ``run`` whose checkpoints' stored config hides ``os.system`` inside the model node, as a
    downloaded file could."""
    shutil.copytree(run, dest)
    for name in ("best.ckpt", "last.ckpt"):
        path = dest / "checkpoints" / name
        ckpt = torch.load(path, weights_only=True)
        ckpt["hyper_parameters"]["cfg"]["model"]["encoder_channels"] = {
            "_target_": "os.system", "_args_": [f"touch {marker}"]}
        torch.save(ckpt, path)
    return dest


def test_a_crafted_checkpoint_config_runs_no_code_in_any_command(tiny_run, tmp_path):
    """Item 4: evaluate, predict, export, train resume= and report refuse the config, naming its key and target,
    and the shell command never runs."""
    from segvoc.config import compose
    from segvoc.errors import UntrustedConfigError
    from segvoc.evaluate import evaluate
    from segvoc.export import export_model
    from segvoc.predict import predict
    from segvoc.reporting.study import build_report
    from segvoc.train import train

    marker = tmp_path / "PWNED"
    run = _crafted(tiny_run, tmp_path / "downloaded", marker)
    best = run / "checkpoints" / "best.ckpt"
    image = next((tiny_run / "splits").glob("*.txt"))  # any file: refused before it is read
    attempts = {
        "evaluate": lambda: evaluate(compose([f"ckpt={best}", f"paths.output_dir={tmp_path / 'e'}"],
                                             config_name="evaluate")),
        "predict": lambda: predict(compose([f"ckpt={best}", f"input={image}", f"paths.output_dir={tmp_path / 'p'}"],
                                           config_name="predict")),
        "export": lambda: export_model(compose([f"ckpt={best}", "format=torchscript"], config_name="export")),
        "resume": lambda: train(compose([f"resume={run}", f"paths.output_dir={run}"])),
        "report": lambda: build_report(str(run), tmp_path / "r", {}, num_images=1),
    }
    for name, attempt in attempts.items():
        with pytest.raises(UntrustedConfigError, match=r"model\.encoder_channels\._target_='os\.system'"):
            attempt()
        assert not marker.exists(), name


@pytest.mark.parametrize("target", ["segvoc.utils.os.system", "torch.nn.modules.module.torch.hub.load",
                                    "segvoc.engine.checkpoint.torch.load", "pytorch_lightning.Trainer.__init__",
                                    "pytorch_lightning.Trainerx"])
def test_a_target_that_reaches_outside_the_allowlist_through_an_allowed_module_is_refused(tiny_run, target):
    """A name that starts with an allowed module but walks out of it (``segvoc.utils`` imports ``os``) is judged by
    where the object is defined; every target segvoc's own configs name still passes."""
    from segvoc.config import CONF_DIR
    from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint
    from segvoc.errors import UntrustedConfigError
    from segvoc.safety.trust import SIGNATURE_KEY, allowed

    ckpt = read_checkpoint(tiny_run / "checkpoints" / "best.ckpt")
    ckpt["hyper_parameters"].pop(SIGNATURE_KEY, None)  # as downloaded: not signed by this user
    ckpt["hyper_parameters"]["cfg"]["model"]["encoder_channels"] = {"_target_": target, "_args_": ["x"]}
    with pytest.raises(UntrustedConfigError, match=rf"model\.encoder_channels\._target_='{target}'"):
        checkpoint_config(ckpt)
    shipped = {line.split("_target_:")[1].split()[0] for path in CONF_DIR.rglob("*.yaml")
               for line in path.read_text().splitlines() if "_target_:" in line and "{" not in line}
    assert len(shipped) > 30 and all(allowed(t) for t in shipped), sorted(t for t in shipped if not allowed(t))


def test_an_untrusted_exported_file_and_the_cli_refuse_before_writing(tiny_run, tmp_path):
    """The config stored in an exported file is checked too; on the command line the refusal is one line and
    evaluate creates no output folder."""
    from segvoc.deploy.exported import check_stored_config
    from segvoc.deploy.formats import METADATA_KEY
    from segvoc.errors import UntrustedConfigError

    cfg = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]["cfg"]
    cfg["loss"] = {"_target_": "builtins.exec", "_args_": ["import os"]}
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path),
                   _extra_files={METADATA_KEY: json.dumps({"config": cfg, "returns": "logits"})})
    with pytest.raises(UntrustedConfigError, match=r"loss\._target_='builtins\.exec'"):
        check_stored_config(path)
    out = tmp_path / "eval"
    r = _cli("segvoc.evaluate", f"ckpt={path}", f"hydra.run.dir={out}")
    _one_line_refusal(r, f"{path}: its stored config sets loss._target_='builtins.exec'")
    assert not out.exists()


def test_own_signed_configs_keep_their_targets_and_a_forged_signature_does_not(tiny_run, tmp_path, monkeypatch):
    """A config segvoc wrote for this user (signed) may name any target typed on the command line (a test callback,
    a lab's own model); the same config under another user's key is held to the allowlist, and so is a signed
    config edited afterwards."""
    from segvoc.engine.checkpoint import checkpoint_config, read_checkpoint
    from segvoc.errors import UntrustedConfigError

    ckpt = read_checkpoint(tiny_run / "checkpoints" / "best.ckpt")
    cfg = ckpt["hyper_parameters"]["cfg"]
    cfg["callbacks"]["mine"] = {"_target_": "tests.helpers.RecordSeeds", "path": "x"}
    from segvoc.safety.trust import SIGNATURE_KEY, sign

    ckpt["hyper_parameters"][SIGNATURE_KEY] = sign(cfg)
    assert checkpoint_config(ckpt).callbacks.mine._target_ == "tests.helpers.RecordSeeds"
    assert checkpoint_config(ckpt, trusted=["tests.helpers"]).callbacks.mine.path == "x"
    cfg["callbacks"]["mine"]["path"] = "y"  # edited after signing
    with pytest.raises(UntrustedConfigError, match="callbacks.mine._target_='tests.helpers.RecordSeeds'"):
        checkpoint_config(ckpt)
    assert checkpoint_config(ckpt, trusted=["tests.helpers"]).callbacks.mine.path == "y"  # trusted on purpose
    cfg["callbacks"]["mine"]["path"] = "x"
    monkeypatch.setenv("SEGVOC_HOME", str(tmp_path / "another_user"))
    with pytest.raises(UntrustedConfigError):
        checkpoint_config(ckpt)


def test_hub_weights_load_as_tensors_and_a_cached_file_is_hash_checked(tmp_path, monkeypatch):
    """ImageNet weights are read with ``weights_only=True`` and ``check_hash=True``; a file already in the hub
    cache whose content does not match the hash in its name is refused in one line."""
    from torchvision.models import ResNet34_Weights

    from segvoc.errors import WeightsError
    from segvoc.models import weights as module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    seen = {}

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        raise OSError("offline")

    monkeypatch.setattr(type(ResNet34_Weights.IMAGENET1K_V1), "get_state_dict", spy)
    with pytest.raises(WeightsError, match="cannot get ImageNet resnet34 weights"):
        module.load_backbone_state("imagenet", "resnet34")
    assert seen == {"progress": True, "check_hash": True, "weights_only": True}
    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet34_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the published weights")
    with pytest.raises(WeightsError, match=r"its sha256 does not start with b627a593"):
        module.load_backbone_state("imagenet", "resnet34")


# ---- I: resume keeps everything ------------------------------------------------------------------------------------

def test_resume_appends_to_the_csv_history(smoke_cfg, tmp_path):
    """Item 7: ``logger=csv``: the resumed run appends to ``csv/metrics.csv`` (Lightning's CSVLogger deleted it), and
    drops what the earlier launch logged after its last checkpoint (logged again now), as TensorBoard's purge_step."""
    import csv

    from segvoc.config import compose
    from segvoc.train import train

    table = tmp_path / "csv" / "metrics.csv"

    def validated_epochs() -> list[str]:
        with open(table, newline="") as f:
            return [r["epoch"] for r in csv.DictReader(f) if r.get("val/miou")]

    train(smoke_cfg("logger=csv", "trainer.max_epochs=1", "data.subset=2"))
    assert validated_epochs() == ["0"]
    # the earlier launch validated epoch 1 and was killed before saving it: a row at the checkpoint's step
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    with open(table, newline="") as f:
        header = next(csv.reader(f))
    with open(table, "a", newline="") as f:
        csv.DictWriter(f, header).writerow({"epoch": "1", "step": str(step), "val/miou": "0.5"})
    assert validated_epochs() == ["0", "1"]
    train(compose([f"resume={tmp_path}", f"paths.output_dir={tmp_path}", "trainer.max_epochs=2"]))
    assert validated_epochs() == ["0", "1"]


def test_a_moved_run_keeps_its_best_checkpoint_tracking(smoke_cfg, tmp_path):
    """Item 8: a run directory moved, then resumed: a worse epoch does not overwrite ``best.ckpt`` (Lightning drops
    ``best_model_score`` when ``dirpath`` changed)."""
    from segvoc.config import compose
    from segvoc.train import train

    first = tmp_path / "first"
    train(smoke_cfg(f"paths.output_dir={first}", "trainer.max_epochs=1", "data.subset=2"))
    last = first / "checkpoints" / "last.ckpt"
    pin_unbeatable_best(last)  # a best no later epoch of this run can beat
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    best = (moved / "checkpoints" / "best.ckpt").read_bytes()
    train(compose([f"resume={moved}", f"paths.output_dir={moved}", "trainer.max_epochs=2"]))
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1  # it trained on
    assert (moved / "checkpoints" / "best.ckpt").read_bytes() == best


def test_resume_keeps_the_early_stopping_decision(smoke_cfg, tmp_path):
    """A checkpoint saved after early stopping decided to stop resumes to no further epoch."""
    from segvoc.config import compose
    from segvoc.train import train

    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2", "callbacks.early_stopping.patience=3"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EarlyStopping"))
    state.update(wait_count=3, stopped_epoch=0, decided=True)  # as saved when its patience had run out
    torch.save(ckpt, last)
    steps = ckpt["global_step"]
    (tmp_path / "metrics.json").unlink()
    train(compose([f"resume={tmp_path}", f"paths.output_dir={tmp_path}", "trainer.max_epochs=3"]))
    assert torch.load(last, weights_only=True)["global_step"] == steps


def test_early_stopping_records_its_decision():
    from types import SimpleNamespace

    from segvoc.engine.callbacks import ResumableEarlyStopping

    es = ResumableEarlyStopping(monitor="val/miou", mode="max", patience=1)
    assert not es._evaluate_stopping_criteria(torch.tensor(0.5))[0] and not es.decided
    assert es._evaluate_stopping_criteria(torch.tensor(0.4))[0] and es.decided
    es._evaluate_stopping_criteria(torch.tensor(0.6))  # a later improvement (min_epochs kept it training) ...
    assert es.decided  # ... does not take the decision back, as Lightning's trainer.should_stop stays set
    restored = ResumableEarlyStopping(monitor="val/miou", mode="max", patience=1)
    restored.load_state_dict(es.state_dict())
    trainer = SimpleNamespace(should_stop=False)
    restored.on_train_start(trainer, None)
    assert trainer.should_stop
