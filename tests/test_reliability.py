"""Resume after a real SIGKILL, pre-emption, NaN loss, atomic files, safe and checked checkpoint loading."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segvoc.config import REPO_ROOT

COMMON = ["data=synthetic", "data.synthetic=null", "debug=smoke", "trainer.max_epochs=3", "data.subset=24",
          "data.batch_size=1", "data.image_size=64", "trainer.enable_progress_bar=false", "model=fcn_dilated",
          "model.bottleneck_channels=64", "model.decoder_channels=[64,64,64,32,32]", "scheduler=cosine"]
AUGMENT = {"random": "augment=report", "none": "augment=none"}


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segvoc.train", *COMMON, f"data.root={root}", f"paths.output_root={out}",
            f"hydra.run.dir={out}/run", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, synthetic_root) -> dict[str, Path]:
    """Uninterrupted runs without loader workers, one per augmentation setting (run once, on demand)."""
    runs: dict[str, Path] = {}

    def get(aug: str) -> Path:
        if aug not in runs:
            out = tmp_path_factory.mktemp(f"ref_{aug}")
            ref = subprocess.run(_train_cmd(synthetic_root, out, AUGMENT[aug], "data.num_workers=0"), cwd=REPO_ROOT,
                                 env=_env(), capture_output=True, text=True, timeout=600)
            assert ref.returncode == 0, ref.stderr[-3000:]
            runs[aug] = out / "run"
        return runs[aug]

    return get


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path) -> None:
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)


def _resume_and_compare(run: Path, reference: Path) -> None:
    """Resume ``run`` and check it ends exactly as the uninterrupted ``reference``: metrics and every weight."""
    resumed = subprocess.run([sys.executable, "-m", "segvoc.train", f"resume={run}"], cwd=REPO_ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr  # Lightning's "unreliable results" warning
    assert "Tip:" not in resumed.stderr  # no advertising in segvoc's output
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"] == 2
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, f"{len(differing)} of {len(a['state_dict'])} tensors differ"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("aug", ["random", "none"])
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, synthetic_root, reference_runs, workers, aug):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(synthetic_root, tmp_path, AUGMENT[aug], f"data.num_workers={workers}"),
                            cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(proc, run)  # the first epoch's checkpoint: the run is now in epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "metrics.json").exists()  # it really died before finishing
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] < 2
    _resume_and_compare(run, reference_runs(aug))
    # the original config is kept; TensorBoard continues in the same folder without duplicate epochs
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra_resume").is_dir()
    from segvoc.report import read_scalars

    assert len(read_scalars(run, ["val/loss"])["val/loss"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "where"), [(signal.SIGTERM, "train"), (signal.SIGINT, "train"),
                                            (signal.SIGTERM, "val"), (signal.SIGINT, "val")])
def test_interrupt_then_resume_is_exact(tmp_path, synthetic_root, reference_runs, sig, where):
    """SIGTERM (pre-emption) and Ctrl-C with loader workers and random augmentation, after the first epoch-end
    checkpoint: in the middle of a training epoch (a checkpoint is saved at the batch boundary) or during
    validation (the epoch-end checkpoint is kept). Either way the run exits non-zero with one line and the resumed
    run ends bit-identical to an uninterrupted one."""
    run = tmp_path / "run"
    at = "+callbacks.signal_at._target_=tests.helpers.SignalAt"
    proc = subprocess.Popen(_train_cmd(synthetic_root, tmp_path, AUGMENT["random"], "data.num_workers=2", at,
                                       "+callbacks.signal_at.step=34", f"+callbacks.signal_at.sig={int(sig)}",
                                       f"+callbacks.signal_at.where={where}"),
                            cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted at"))]
    assert f"resume={run}" in lines[-1] and lines[-1].startswith("error:") and "Traceback" not in err, err[-2000:]
    assert not list((run / "checkpoints").glob("*.tmp"))  # no half-written files left behind
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    if where == "train":  # 24 steps per epoch: step 34 is batch 10 of epoch 1
        assert "saved" in lines[0] and "(batch 10 of epoch 1)" in lines[0], lines
        assert saved["global_step"] == 34
    else:  # validation after epoch 1 (step 48): the checkpoint of epoch 0's end stays
        assert "kept" in lines[0], lines
        assert saved["global_step"] == 24
    assert not (run / "metrics.json").exists()
    _resume_and_compare(run, reference_runs("random"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(smoke_cfg, tmp_path, monkeypatch):
    from segvoc.engine.task import SegmentationTask
    from segvoc.errors import NonFiniteLossError
    from segvoc.train import train

    step = SegmentationTask.training_step

    def nan_from_epoch_1(self, batch, batch_idx):  # a good first epoch (its checkpoint is saved), then NaN
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch >= 1 else loss

    monkeypatch.setattr(SegmentationTask, "training_step", nan_from_epoch_1)
    cfg = smoke_cfg("trainer.max_epochs=3", "trainer.log_every_n_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step \d+;"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0, last["global_step"]  # the last good checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_resume_applies_where_to_run_and_refuses_what_to_train(tmp_path, synthetic_root):
    """``resume=<run> trainer=... trainer.max_epochs=...`` continue the run with them; ``model=`` or a key that
    changes what is trained is refused with one line naming it."""
    run = tmp_path / "run"
    first = subprocess.run(_train_cmd(synthetic_root, tmp_path, AUGMENT["none"], "trainer.max_epochs=1",
                                      "data.subset=4"),
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (run / "metrics.json").unlink()

    def resume(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "segvoc.train", f"resume={run}", *extra], cwd=REPO_ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)

    for refused, key in (("model=unet", "model"), ("loss.background_scale=80", "loss.background_scale"),
                         ("data.batch_size=4", "data.batch_size"), ("experiment=4b_improved", "experiment")):
        r = resume(refused)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: {refused}: {key} cannot change"), r.stderr
    if not torch.cuda.is_available():  # a group override is applied: trainer=gpu really asks for a GPU
        r = resume("trainer=gpu")
        assert r.returncode != 0 and "gpu" in r.stderr.lower()
    r = resume("trainer=cpu", "trainer.max_epochs=2", "logger=none")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # trained on for the extra epoch
    stored = ckpt["hyper_parameters"]["cfg"]
    assert stored["trainer"]["accelerator"] == "cpu" and stored["logger"] == {}


def test_checkpoint_from_another_model_is_a_clear_error(smoke_cfg, tmp_path):
    from segvoc.errors import WeightsError
    from segvoc.train import train

    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # ckpt_path takes a full state (best.ckpt holds weights only)
    with pytest.raises(WeightsError, match=r"does not fit model UNet .*checkpoint: model fcn_baseline"):
        train(smoke_cfg("model=unet", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'b'}"))


def test_checkpoints_load_weights_only(tmp_path):
    from segvoc.engine.checkpoint import read_checkpoint
    from segvoc.errors import WeightsError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": {}}, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="cannot load checkpoint safely"):
        read_checkpoint(tmp_path / "evil.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="cannot load checkpoint safely"):
        read_checkpoint(tmp_path / "trunc.ckpt")


def test_atomic_json_never_truncated(tmp_path, monkeypatch):
    from segvoc.utils import write_json

    write_json(tmp_path / "m.json", {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_json(tmp_path / "m.json", {"a": 2, "b": "x" * 10000})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_fails_before_training(smoke_cfg, tmp_path):
    from segvoc.errors import ConfigError
    from segvoc.train import train

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(ConfigError, match="not writable"):
        train(smoke_cfg(f"paths.output_dir={ro / 'run'}"))


def test_unwritable_output_path_fails_before_training(smoke_cfg, tmp_path):
    from segvoc.errors import ConfigError
    from segvoc.train import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        train(smoke_cfg(f"paths.output_dir={blocker / 'run'}"))




def test_lightning_save_last_alone_does_not_write_every_epoch(smoke_cfg, tmp_path):
    """Why callbacks/default.yaml has a second checkpoint callback for last.ckpt: in the pinned Lightning,
    ``ModelCheckpoint(monitor=val/miou, save_last=True)`` writes last.ckpt only when the monitored top-k improves
    (with lr 0 only BatchNorm statistics move: the best epoch here is 1 of 0-2), while ``last_checkpoint`` writes
    it at every epoch end (the resume point)."""
    from segvoc.train import train

    common = ("trainer.max_epochs=3", "optimizer.lr=0.0", "callbacks.early_stopping=null")
    train(smoke_cfg(*common, "callbacks.model_checkpoint.save_last=true", "callbacks.last_checkpoint=null",
                    f"paths.output_dir={tmp_path / 'save_last'}"))
    saved = tmp_path / "save_last" / "checkpoints"
    last, best = (torch.load(saved / f"{n}.ckpt", weights_only=True)["epoch"] for n in ("last", "best"))
    assert last == best < 2  # last.ckpt followed the best epoch, not the last one
    train(smoke_cfg(*common, f"paths.output_dir={tmp_path / 'ours'}"))
    assert torch.load(tmp_path / "ours" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_resume_auto_starts_skips_resumes_and_refuses_another_runs_dir(smoke_cfg, tmp_path, capsys):
    from omegaconf import open_dict

    from segvoc.errors import ConfigError
    from segvoc.train import train

    first = train(smoke_cfg("resume=auto"))                       # nothing there: starts
    assert (tmp_path / "metrics.json").is_file()
    assert train(smoke_cfg("resume=auto")) == json.loads((tmp_path / "metrics.json").read_text())  # finished
    assert f"skipped, finished: {tmp_path}" in capsys.readouterr().out
    (tmp_path / "metrics.json").unlink()                          # as if killed before scoring: resumes
    cfg = smoke_cfg("resume=auto")
    assert train(cfg)["test"] == first["test"]
    with pytest.raises(ConfigError, match="holds another run's files"):
        train(smoke_cfg())                                        # a plain run never writes into another's dir
    with pytest.raises(ConfigError, match="choose one"):
        cfg = smoke_cfg("overwrite=true")
        with open_dict(cfg):
            cfg.resume = str(tmp_path)
        train(cfg)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- loss=dice\n")
    with pytest.raises(ConfigError, match="other overrides"):  # launched differently: never resumed or skipped
        from segvoc.runs.directory import auto_resume

        auto_resume(smoke_cfg("resume=auto"), ["loss=ce"])
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert train(smoke_cfg("overwrite=true"))["test"] == first["test"]  # starts again from scratch, same result
    assert (tmp_path / "metrics.json").stat().st_mtime_ns > stamp
