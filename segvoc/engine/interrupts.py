"""Stopping on SIGTERM (pre-emption) or Ctrl-C at a batch boundary, keeping a checkpoint that resumes exactly."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segvoc.data.sampling import epoch_position

REQUEUE_SIGNAL = signal.SIGUSR2  # what submitit listens to (SLURM sends it signal_delay_s before the time limit)


class RequeueRequested(SIGTERMException):
    """Raised at a batch boundary after submitit's requeue signal: stop like a pre-emption, then requeue."""


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


class PreemptionCheckpoint(Callback):
    """On SIGTERM (pre-emption) or Ctrl-C: keep a checkpoint that resumes exactly, and say how to resume.

    Both signals only set a flag; the run stops at the next batch boundary, so a signal never lands in the
    middle of a checkpoint write. (Lightning does this for SIGTERM; this callback does it for SIGINT.) A second
    Ctrl-C interrupts at once.

    Under submitit (``hydra/launcher=slurm`` or ``local``), its requeue signal (``SIGUSR2``) is taken over during
    the fit the same way: the run stops at the next batch boundary, keeps the checkpoint as below, and only then
    hands over to submitit's own handler (``requeue()``), which requeues the job and exits; the requeued job
    continues the run with ``resume=auto``.

    Stopped between two training batches, the run saves ``last.ckpt`` with the train loader's position
    (``ResumableLoader``), which resumes exactly. Stopped anywhere else (validation, before the first batch of an
    epoch, after the last), the epoch-end ``last.ckpt`` is kept and the interrupted epoch is replayed on resume:
    a partial validation cannot be saved, and replacing an exact checkpoint by an inexact one would lose more.
    """

    def __init__(self, dirpath: str | Path, run_dir: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.run_dir = Path(run_dir)
        self.saved: Path | None = None
        self.interrupted = False
        self._sigint_requested = False
        self._requeue_requested = False
        self._previous_handler: Any = None
        self._submitit_handler: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            if _is_submitit_handler(signal.getsignal(REQUEUE_SIGNAL)):
                self._submitit_handler = signal.signal(REQUEUE_SIGNAL, self._on_requeue_signal)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._sigint_requested = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_requested = True

    def requeue(self) -> None:
        """Hand over to submitit's requeue handler (which requeues this job and exits the process)."""
        assert self._submitit_handler is not None
        self._submitit_handler(REQUEUE_SIGNAL, None)

    def _stop_if_requested(self) -> None:
        if self._requeue_requested:
            self._requeue_requested = False
            raise RequeueRequested
        if self._sigint_requested:
            self._sigint_requested = False
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if self._submitit_handler is not None and signal.getsignal(REQUEUE_SIGNAL) == self._on_requeue_signal:
            signal.signal(REQUEUE_SIGNAL, self._submitit_handler)
            if self._requeue_requested:  # came after the last batch boundary: let submitit act on it now
                self._requeue_requested = False
                os.kill(os.getpid(), REQUEUE_SIGNAL)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        self.interrupted = True
        path = self.dirpath / "last.ckpt"
        done, total = epoch_position(trainer)
        if trainer.training and 0 < done < total:
            trainer.save_checkpoint(path)
            self.saved = path
            what = f"saved {path} (batch {done} of epoch {trainer.current_epoch})"
        elif path.is_file():
            what = f"kept {path} (end of the last finished epoch; the interrupted epoch is replayed)"
        else:
            what = "no checkpoint yet (stopped in the first epoch)"
        if trainer.is_global_zero:
            hint = (f"resume with: python -m segvoc.train resume={self.run_dir}" if path.is_file()
                    else "run the same command again to start over")
            if isinstance(exception, RequeueRequested):
                hint = "submitit requeues the job, which continues this run (resume=auto)"
            print(f"interrupted at step {trainer.global_step}: {what}; {hint}", file=sys.stderr, flush=True)
