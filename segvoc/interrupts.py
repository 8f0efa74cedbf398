"""Stopping on SIGTERM (pre-emption) or Ctrl-C at a batch boundary, keeping a checkpoint that resumes exactly."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segvoc.data.sampling import epoch_position


class PreemptionCheckpoint(Callback):
    """On SIGTERM (pre-emption) or Ctrl-C: keep a checkpoint that resumes exactly, and say how to resume.

    Both signals only set a flag; the run stops at the next batch boundary, so a signal never lands in the
    middle of a checkpoint write. (Lightning does this for SIGTERM; this callback does it for SIGINT.) A second
    Ctrl-C interrupts at once.

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
        self._previous_handler: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._sigint_requested = True
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)

    def _stop_if_requested(self) -> None:
        if self._sigint_requested:
            self._sigint_requested = False
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._stop_if_requested()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

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
            print(f"interrupted at step {trainer.global_step}: {what}; {hint}", file=sys.stderr, flush=True)
