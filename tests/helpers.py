"""Test-only helpers that runs load through their config (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Send ``sig`` to this very process once, at a chosen place: after training step ``step`` (``where=train``),
    or during the first validation batch after it (``where=val``). A real signal through the real handlers, at a
    point a test can name instead of guessing it with a sleep. Only in a run started afresh, and with ``job`` set,
    only in that job of a sweep. Under DDP: with ``rank`` set only that rank sends; ``group=true`` sends to the
    whole process group (every rank) instead of this process alone; ``stamp``: a file to write the sending time to;
    ``batch``: only after that batch index of the epoch (with gradient accumulation several batches share a step);
    ``hold`` seconds of sleep for rank ``hold_rank`` at the end of step ``step``, before it sends and before the stop
    check (orders a DDP race deterministically). With ``SIGNAL_AT_OFF=1`` in the environment it never sends: a test
    runs the same command (the same sweep job folders) again without the signal."""

    def __init__(self, step: int, sig: int = signal.SIGTERM, where: str = "train", job: int | None = None,
                 rank: int | None = None, group: bool = False, stamp: str | None = None,
                 batch: int | None = None, hold: float = 0.0, hold_rank: int | None = None) -> None:
        self.step, self.sig, self.where, self.job = step, int(sig), where, job
        self.rank, self.group, self.stamp, self.batch = rank, group, stamp, batch
        self.hold, self.hold_rank = hold, hold_rank
        self.sent = False

    def _this_job(self) -> bool:
        from hydra.core.hydra_config import HydraConfig

        return self.job is None or int(HydraConfig.get().job.num) == self.job

    def _send(self, trainer: pl.Trainer) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if os.environ.get("SIGNAL_AT_OFF") == "1":
            return
        if not self.sent and not trainer.ckpt_path and self._this_job():  # never in a resumed run
            self.sent = True
            if self.stamp:  # when it was sent (time.time()), for a test that bounds the time to stop
                Path(self.stamp).write_text(repr(time.time()))
            if self.group:  # the whole process group, as Ctrl-C in a terminal or a scheduler's signal to the job
                os.killpg(os.getpgid(0), self.sig)
            else:
                os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hold and trainer.global_step == self.step and trainer.global_rank == self.hold_rank:
            time.sleep(self.hold)  # this rank reaches the stop check late: the others run ahead unless they wait
        if self.where == "train" and trainer.global_step == self.step and self.batch in (None, batch_idx):
            self._send(trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "val" and not trainer.sanity_checking and trainer.global_step >= self.step:
            self._send(trainer)


class SubmititRequeueStub(pl.Callback):
    """Installs submitit's own ``SignalHandler.checkpoint_and_try_requeue`` for SIGUSR2, as a submitit job does,
    with a job environment whose ``_requeue`` appends ``rank <global rank>`` to the file ``record`` and returns
    (instead of calling ``scontrol``). For DDP runs, where Lightning's subprocess launcher starts the other ranks
    as plain processes that submitit's local launcher cannot wrap. The environment claims global rank 0 on every
    rank, so submitit's own "only rank 0 requeues" filter does not hide a call made on another rank."""

    def __init__(self, record: str) -> None:
        self.record = record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import signal as _signal
        from types import SimpleNamespace

        from submitit.core.job_environment import SignalHandler

        record, rank = Path(self.record), trainer.global_rank

        def requeue(countdown: int) -> None:
            with open(record, "a") as f:
                f.write(f"rank {rank}\n")
            print(f"requeue stub called on rank {rank}", file=sys.stderr, flush=True)

        env = SimpleNamespace(global_rank=0, _requeue=requeue)
        delayed = SimpleNamespace(_timeout_min=600, _timeout_countdown=3, function=print)
        handler = SignalHandler(env, SimpleNamespace(), delayed)  # type: ignore[arg-type]
        _signal.signal(_signal.SIGUSR2, handler.checkpoint_and_try_requeue)


class RecordSeeds(pl.Callback):
    """Appends ``epoch batch_idx rank seed`` to the file ``path`` after each training batch: the seed the task gave
    the global generator (dropout's) for that batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        import torch

        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {batch_idx} {trainer.global_rank} {torch.initial_seed()}\n")


class HoldUntil(pl.Callback):
    """Waits at the start of training until the file ``release`` exists (at most ``timeout`` seconds), after writing
    ``ready``: a test holds a launch at a known point while it starts another one."""

    def __init__(self, ready: str, release: str, timeout: float = 120.0) -> None:
        self.ready, self.release, self.timeout = Path(ready), Path(release), timeout

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.ready.write_text(str(os.getpid()))
        deadline = time.time() + self.timeout
        while not self.release.exists() and time.time() < deadline:
            time.sleep(0.05)


LAB_MATE = 65534  # "nobody": the other user of a shared folder, in tests run as root


def shared_folder() -> Path:
    """A fresh folder under /tmp that another user can read but not write (mode 0755; pytest's tmp_path is 0700
    when run as root, which would hide it from that user). The caller removes it."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="segvoc-shared-", dir="/tmp"))
    folder.chmod(0o755)
    return folder


def lab_mate(imports: str, body: str, *args: str) -> Any:
    """Start ``python -c`` running ``imports``, then ``body`` as another user (``nobody``) when the tests run as
    root, so that files this process made are someone else's: readable, not writable. The user is changed after
    the imports (this Python lives under /root, which that user cannot read). Not root: all as this user (the
    caller makes the files read-only with chmod, which binds a non-root user). Returns the Popen (text pipes)."""
    import subprocess

    from segvoc.config import REPO_ROOT

    drop = (f"if os.geteuid() == 0:\n    os.setgroups([]); os.setgid({LAB_MATE}); os.setuid({LAB_MATE})\n"
            "assert os.geteuid() != 0\n")
    script = f"import os, sys\n{imports}\n{drop}{body}\n"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd="/tmp", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def pin_unbeatable_best(last: Path) -> None:
    """Give the best-checkpoint tracking stored in ``last`` (a last.ckpt) a best val mIoU of 0.999, which no later
    epoch of a smoke run can beat (Lightning saves by ``best_k_models`` and reports ``best_model_score``)."""
    import torch

    ckpt = torch.load(last, weights_only=True)
    tracking = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'val/miou'")]
    assert len(tracking) == 1
    tracking[0]["best_model_score"] = torch.tensor(0.999)
    tracking[0]["best_k_models"] = {path: torch.tensor(0.999) for path in tracking[0]["best_k_models"]}
    torch.save(ckpt, last)
