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

COMMON = ["data=synthetic", "data.synthetic=null", "trainer=smoke", "trainer.max_epochs=4", "data.subset=12",
          "data.image_size=64", "trainer.enable_progress_bar=false", "model=fcn_dilated", "augment=report",
          "model.bottleneck_channels=64", "model.decoder_channels=[64,64,64,32,32]", "scheduler=cosine"]


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segvoc.train", *COMMON, f"data.root={root}", f"paths.output_root={out}",
            f"hydra.run.dir={out}/run", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_run_then_resume_gives_identical_metrics(tmp_path, synthetic_root):
    # uninterrupted reference run
    ref = subprocess.run(_train_cmd(synthetic_root, tmp_path / "ref"), cwd=REPO_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "run" / "metrics.json").read_text())

    # same run, killed with SIGKILL as soon as the first epoch's checkpoint exists (i.e. during epoch 2)
    run = tmp_path / "killed" / "run"
    proc = subprocess.Popen(_train_cmd(synthetic_root, tmp_path / "killed"), cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "metrics.json").exists()  # it really died before finishing
    epoch_at_kill = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert epoch_at_kill < 3

    resumed = subprocess.run([sys.executable, "-m", "segvoc.train", f"resume={run}",
                              "trainer.enable_progress_bar=false"],
                             cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text()) == expected
    # and the final weights are bit-identical (metrics alone could come from an epoch before the kill)
    a = torch.load(tmp_path / "ref" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # the original config is kept; TensorBoard continues in the same folder without duplicate epochs
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra_resume").is_dir()
    from segvoc.report import read_scalars

    assert len(read_scalars(run, ["val/loss"])["val/loss"]) == 4


def _start_and_wait_for_checkpoint(root: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """Start a long training run; return once its first ``last.ckpt`` exists (the run is then mid-training)."""
    run = out / "run"
    proc = subprocess.Popen(_train_cmd(root, out, "trainer.max_epochs=50", *extra), cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    return proc, run


def test_sigterm_saves_checkpoint_and_exits_nonzero_with_resume_hint(tmp_path, synthetic_root):
    proc, run = _start_and_wait_for_checkpoint(synthetic_root, tmp_path / "o")
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"resume={run}" in err and "error:" in err and "Traceback" not in err
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns >= before
    assert not list((run / "checkpoints").glob("*.tmp"))  # no half-written files left behind


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(smoke_cfg, tmp_path):
    from segvoc.errors import NonFiniteLossError
    from segvoc.train import train

    cfg = smoke_cfg("optimizer.lr=1e30", "trainer.max_epochs=3", "trainer.log_every_n_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step \d+"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    if last.exists():  # whatever was saved holds only finite weights
        state = torch.load(last, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_checkpoint_from_another_model_is_a_clear_error(smoke_cfg, tmp_path):
    from segvoc.errors import WeightsError
    from segvoc.train import train

    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2"))
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    with pytest.raises(WeightsError, match=r"does not fit model UNet .*checkpoint: model fcn_baseline"):
        train(smoke_cfg("model=unet", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'b'}"))


def test_checkpoints_load_weights_only(tmp_path):
    from segvoc.checkpoint import read_checkpoint
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


def test_ctrl_c_saves_checkpoint_and_says_how_to_resume(tmp_path, synthetic_root):
    proc, run = _start_and_wait_for_checkpoint(synthetic_root, tmp_path / "o")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted at step" in err and f"resume={run}" in err
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > 0
