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
    assert "weights_only" not in resumed.stderr  # checkpoints are read as tensors, and Lightning is told so
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
    from segvoc.reporting.study import read_scalars

    assert len(read_scalars(run, ["val/loss"])["val/loss"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "where"), [(signal.SIGTERM, "train"), (signal.SIGINT, "train"),
                                            (signal.SIGTERM, "val"), (signal.SIGINT, "val"),
                                            (signal.SIGUSR1, "train")])
def test_interrupt_then_resume_is_exact(tmp_path, synthetic_root, reference_runs, sig, where):
    """SIGTERM (pre-emption), Ctrl-C and SIGUSR1 (SLURM's warning signal, outside submitit) with loader workers and
    random augmentation, after the first epoch-end checkpoint: in the middle of a training epoch (a checkpoint is
    saved at the batch boundary) or during validation (the epoch-end checkpoint is kept). Either way the run exits
    non-zero with one line and the resumed run ends bit-identical to an uninterrupted one."""
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
    name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C", signal.SIGUSR1: "SIGUSR1"}[sig]
    assert f"stopped by {name} at step" in lines[-1], lines[-1]
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

    nan_steps = []

    def nan_from_epoch_1(self, batch, batch_idx):  # a good first epoch (its checkpoint is saved), then NaN
        if self.current_epoch < 1:
            return step(self, batch, batch_idx)
        nan_steps.append(self.global_step)
        loss_fn = type(self.criterion).forward
        self.criterion.forward = lambda logits, mask: loss_fn(self.criterion, logits, mask) * float("nan")
        try:  # the loss itself is NaN, where the task's tracker sees it
            return step(self, batch, batch_idx)
        finally:
            del self.criterion.forward

    monkeypatch.setattr(SegmentationTask, "training_step", nan_from_epoch_1)
    # log_every_n_steps=2: the check runs after the second NaN step, and must still name the first
    cfg = smoke_cfg("trainer.max_epochs=3", "trainer.log_every_n_steps=2", "data.batch_size=2")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    assert nan_steps[:2] == [4, 5]  # 8 training images, batch 2: epoch 0 is steps 0-3
    assert f"NaN/inf at step {nan_steps[0]};" in str(err.value)
    assert not (tmp_path / "metrics.json").exists()
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0, last["global_step"]  # the last good checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_tracker_checks_itself_when_more_steps_than_its_buffer_pass_without_a_check():
    """The tracker holds ``log_every_n_steps`` losses on the device. An epoch boundary can put more steps than that
    between two checks (the check runs every n batches of an epoch): a full buffer is checked before it is reused,
    so the first NaN step is still the one named, not a later one."""
    from types import SimpleNamespace

    from segvoc.engine.callbacks import NonFiniteLossCheck
    from segvoc.errors import NonFiniteLossError

    check = NonFiniteLossCheck()
    trainer = SimpleNamespace(log_every_n_steps=3, global_step=0)
    check.on_train_start(trainer, SimpleNamespace(device=torch.device("cpu")))  # sizes the buffer for n=3
    nan = float("nan")
    # batches 0 and 1 of an epoch with 2 batches, then batch 0 of the next: no check ((idx + 1) % 3 != 0)
    for step, (loss, batch_idx) in enumerate([(1.0, 0), (nan, 1), (nan, 0)]):
        trainer.global_step = step
        check.on_train_batch_start(trainer, None, None, batch_idx)
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, batch_idx)
    trainer.global_step = 3
    check.on_train_batch_start(trainer, None, None, 1)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 1;"):
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(nan)}, None, 1)


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




@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_auto_starts_skips_resumes_and_refuses_another_runs_dir(smoke_cfg, tmp_path, capsys):
    from omegaconf import open_dict

    from segvoc.errors import ConfigError
    from segvoc.train import train

    first = train(smoke_cfg("resume=auto"))                       # nothing there: starts
    assert (tmp_path / "metrics.json").is_file()
    assert train(smoke_cfg("resume=auto")) == json.loads((tmp_path / "metrics.json").read_text())  # finished
    assert f"skipped, finished: {tmp_path}" in capsys.readouterr().out
    for name in ("metrics.json", ".segvoc-finished.json"):       # as if killed before scoring: resumes
        (tmp_path / name).unlink()
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
        from segvoc.runs.lifecycle import decide

        decide(smoke_cfg("resume=auto"), ["loss=ce"])
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert train(smoke_cfg("overwrite=true"))["test"] == first["test"]  # starts again from scratch, same result
    assert (tmp_path / "metrics.json").stat().st_mtime_ns > stamp


def test_sigterm_after_a_nan_step_keeps_the_last_good_checkpoint(smoke_cfg, tmp_path, monkeypatch):
    """A SIGTERM between a NaN step and the next finiteness check must not save the NaN weights over the last good
    last.ckpt: the run stops with the NaN error naming the step, and last.ckpt stays the finite epoch-0 one."""
    from segvoc.engine.task import SegmentationTask
    from segvoc.errors import NonFiniteLossError
    from segvoc.train import train

    step = SegmentationTask.training_step

    def nan_from_epoch_1(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch >= 1 else loss

    monkeypatch.setattr(SegmentationTask, "training_step", nan_from_epoch_1)
    # 4 batches per epoch. Step 4 returns NaN: the loss the tracker sees (the one trained on) and the weights turn
    # NaN. SIGTERM after step 5 (batch 2 of 4 of epoch 1: mid-epoch, where a checkpoint would be saved);
    # log_every_n_steps=50: no finiteness check before it.
    cfg = smoke_cfg("trainer.max_epochs=3", "trainer.log_every_n_steps=50", "data.batch_size=2",
                    "+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=6")
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 4;"):
        train(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 4, (last["epoch"], last["global_step"])
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def _seeds(path: Path) -> dict[tuple[int, int, int], int]:
    rows = [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()]
    return {(e, b, r): s for e, b, r, s in rows}


@pytest.mark.slow
def test_interrupt_inside_an_accumulation_window_stops_at_its_end_and_resumes_exactly(smoke_cfg, tmp_path):
    """accumulate_grad_batches=2, SIGTERM after the first micro-batch of a window: the run trains the window's
    second micro-batch and stops at the optimizer step (the accumulated gradient is not thrown away), and the
    resumed run ends as the uninterrupted one. Every micro-batch draws its own dropout seed, the same on resume.
    Resuming that mid-epoch checkpoint with another accumulation or world size is refused with one line."""
    from segvoc.errors import ConfigError, InterruptedRun
    from segvoc.runs.directory import check_resume_position
    from segvoc.train import train

    common = ("model=fcn_dilated", "model.bottleneck_channels=16", "model.decoder_channels=[16,16,16,16,16]",
              "data.batch_size=1", "trainer.accumulate_grad_batches=2", "logger=none")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(smoke_cfg(*common, f"paths.output_dir={ref_dir}", "+callbacks.seeds._target_=tests.helpers.RecordSeeds",
                          f"+callbacks.seeds.path={tmp_path / 'ref_seeds'}"))
    ref_seeds = _seeds(tmp_path / "ref_seeds")
    assert len(ref_seeds) == 16 and len(set(ref_seeds.values())) == 16  # 2 epochs x 8 micro-batches, all distinct
    # 8 batches per epoch = 4 optimizer steps; after batch 2 of epoch 1 (window [2, 3]) global_step is 5
    interrupted = (*common, f"paths.output_dir={run_dir}", "+callbacks.seeds._target_=tests.helpers.RecordSeeds",
                   f"+callbacks.seeds.path={tmp_path / 'run_seeds'}",
                   "+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=5",
                   "+callbacks.signal_at.batch=2")
    with pytest.raises(InterruptedRun):
        train(smoke_cfg(*interrupted))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    position = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (ckpt["global_step"], position) == (6, {"epoch": 1, "batches": 4})  # the window's end, not batch 3
    last = run_dir / "checkpoints" / "last.ckpt"
    for key, value in (("trainer.accumulate_grad_batches", 1), ("trainer.devices", 2), ("trainer.num_nodes", 2)):
        with pytest.raises(ConfigError, match=rf"^{key}={value}: .*last\.ckpt was saved in the middle of epoch 1 "
                                              rf"\(batch 4\) with {key}=\S+.*resume with {key}="):
            check_resume_position(smoke_cfg(*common, f"{key}={value}"), ckpt, last)
    check_resume_position(smoke_cfg(*common), ckpt, last)  # the same settings: fine
    epoch_end = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    check_resume_position(smoke_cfg(*common, "trainer.accumulate_grad_batches=1"), epoch_end, last)  # epoch end: fine
    train(smoke_cfg(*interrupted, "resume=auto"))  # continues the unfinished run (SignalAt never fires on resume)
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((ref_dir / "metrics.json").read_text())
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (ref_dir, run_dir))
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert _seeds(tmp_path / "run_seeds") == ref_seeds  # before the stop and after the resume: the same seeds


def test_prepare_data_runs_only_where_lightning_calls_it(smoke_cfg, tmp_path, monkeypatch):
    """Lightning calls the DataModule's prepare_data on local rank 0 of each node (then a barrier); train() must
    not call it itself on every rank (under srun every rank would download into the same .part file)."""
    import inspect

    from segvoc.data.datamodule import SegmentationDataModule
    from segvoc.train import train

    callers: list[list[str]] = []
    original = SegmentationDataModule.prepare_data

    def spy(self):
        callers.append([Path(f.filename).name for f in inspect.stack()[1:6]])
        return original(self)

    monkeypatch.setattr(SegmentationDataModule, "prepare_data", spy)
    train(smoke_cfg("trainer.max_epochs=1", "data.subset=2"))
    assert callers, "prepare_data never ran"
    assert all("data_connector.py" in stack for stack in callers), callers  # every call came through Lightning


def test_write_probe_never_touches_another_writers_probe(tmp_path):
    """Concurrent ranks or runs probing one run directory: each probes a file of its own, so none deletes the
    probe another is about to remove (a false "not writable")."""
    from segvoc.runs.directory import ensure_writable

    other = tmp_path / "checkpoints" / ".write-test"  # another writer's probe (the name 0.3 used for all), mid-check
    other.parent.mkdir()
    other.write_text("theirs")
    ensure_writable(tmp_path)
    ensure_writable(tmp_path)
    assert other.read_text() == "theirs"
    assert sorted(p.name for p in other.parent.iterdir()) == [".write-test"]  # its own probes are gone
