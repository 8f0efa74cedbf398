"""Stopping on SIGTERM (pre-emption), Ctrl-C or a requeue signal at a batch boundary that every DDP rank reaches
together, keeping a checkpoint that resumes exactly."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from segvoc.data.sampling import epoch_position
from segvoc.engine.callbacks import NonFiniteLossCheck

REQUEUE_SIGNAL = signal.SIGUSR2  # what submitit listens to (SLURM sends it signal_delay_s before the time limit)


class RequeueRequested(SIGTERMException):
    """Raised at a batch boundary after submitit's requeue signal: stop like a pre-emption, then requeue."""


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


# what a stop request asks for, ordered: under DDP the ranks agree on the largest code any rank holds
NO_STOP, STOP_SIGTERM, STOP_SIGUSR1, STOP_SIGUSR2, STOP_SIGINT, STOP_REQUEUE = range(6)
STOP_NAMES = {STOP_SIGTERM: "SIGTERM", STOP_SIGUSR1: "SIGUSR1", STOP_SIGUSR2: "SIGUSR2", STOP_SIGINT: "Ctrl-C",
              STOP_REQUEUE: "the requeue signal (SIGUSR2)"}
# outside submitit, SLURM's warning signals (sbatch --signal=USR1@90 / USR2@90; SIGUSR1 is also Lightning's own
# requeue signal) save and stop like SIGTERM: a resumable stop, exit code 2
STOP_SIGNALS = {signal.SIGTERM: STOP_SIGTERM, signal.SIGUSR1: STOP_SIGUSR1, signal.SIGUSR2: STOP_SIGUSR2,
                signal.SIGINT: STOP_SIGINT}


def stop_exception(code: int) -> BaseException:
    """The exception that ends a fit for a stop request ``code`` (Lightning saves nothing on its own for these)."""
    if code == STOP_REQUEUE:
        return RequeueRequested()
    if code == STOP_SIGINT:
        return KeyboardInterrupt()
    return SIGTERMException()


def signal_name(exc: BaseException, preempt: PreemptionCheckpoint) -> str:
    """What stopped a fit, for the one-line message: the signal the ranks agreed on, else Lightning's own."""
    if preempt.stopped_by:
        return preempt.stopped_by
    return "SIGTERM" if isinstance(exc, SIGTERMException) else "Ctrl-C"


class PreemptionCheckpoint(Callback):
    """On SIGTERM (pre-emption), Ctrl-C or submitit's requeue signal: keep a checkpoint that resumes exactly.

    Each signal only records a stop request; the run stops at the next point where every rank can stop together:
    the end of a training batch that closes an accumulation window (so accumulated gradients are never lost), or
    the end of a validation run (single process: also any validation batch). A second Ctrl-C interrupts at once.
    Under DDP the ranks agree there with one tiny collective (``all_reduce`` MAX of a one-element tensor on the
    root device, kept across steps): a signal that reaches one rank only (SIGTERM to rank 0) or every rank at a
    slightly different moment (Ctrl-C in a terminal, ``scancel``) stops all ranks after the same batch, so they
    save together instead of one rank waiting in the checkpoint barrier while the others are in the gradient
    all-reduce. This callback takes SIGTERM over from Lightning's handler once training starts, because
    Lightning's check lets each rank stop on its own flag.

    Under submitit (``hydra/launcher=slurm`` or ``local``), its requeue signal (``SIGUSR2``) is handled the same
    way; after the checkpoint is kept, rank 0 only hands over to submitit's own handler (``requeue()``), which
    requeues the job and exits; the requeued job continues the run with ``resume=auto``.

    Stopped between two training batches, the run saves ``last.ckpt`` with the train loader's position
    (``ResumableLoader``), which resumes exactly. Stopped anywhere else (validation, before the first batch of an
    epoch, after the last), the epoch-end ``last.ckpt`` is kept and the interrupted epoch is replayed on resume:
    a partial validation cannot be saved, and replacing an exact checkpoint by an inexact one would lose more.
    Nothing is saved after a NaN/inf loss: the last good ``last.ckpt`` stays (``nonfinite_step`` says where).
    """

    def __init__(self, dirpath: str | Path, run_dir: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.run_dir = Path(run_dir)
        self.saved: Path | None = None
        self.interrupted = False
        self.nonfinite_step: int | None = None
        self._requested = NO_STOP
        self.stopped_by: str | None = None  # the signal the ranks agreed to stop for (STOP_NAMES)
        self._flag: torch.Tensor | None = None
        self._previous: dict[int, Any] = {}
        self._submitit_handler: Any = None

    def _take(self, signum: int) -> None:
        current = signal.getsignal(signum)
        if current != self._on_signal:  # (again after Lightning installed its own handler over ours)
            self._previous.setdefault(signum, current)
            signal.signal(signum, self._on_signal)

    def _take_user_signals(self) -> None:
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            if signum != REQUEUE_SIGNAL or self._submitit_handler is None:
                self._take(signum)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flag = torch.zeros(1, dtype=torch.int32, device=trainer.strategy.root_device)
        if threading.current_thread() is threading.main_thread():
            self._take(signal.SIGINT)
            if _is_submitit_handler(signal.getsignal(REQUEUE_SIGNAL)):
                self._submitit_handler = signal.getsignal(REQUEUE_SIGNAL)
                self._take(REQUEUE_SIGNAL)
            self._take_user_signals()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its SIGTERM handler (and, under SLURM, its SIGUSR1 requeue) after on_fit_start: take
        # them over only now
        if trainer.received_sigterm:  # came during the sanity check
            self._requested = max(self._requested, STOP_SIGTERM)
        if threading.current_thread() is threading.main_thread():
            self._take(signal.SIGTERM)
            self._take_user_signals()

    def _on_signal(self, signum: int, frame: Any) -> None:
        submitit = signum == REQUEUE_SIGNAL and self._submitit_handler is not None
        code = STOP_REQUEUE if submitit else STOP_SIGNALS[signum]
        self._requested = max(self._requested, code)
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT) or signal.default_int_handler)

    def requeue(self) -> None:
        """Hand over to submitit's requeue handler (which requeues this job and exits the process)."""
        assert self._submitit_handler is not None
        self._submitit_handler(REQUEUE_SIGNAL, None)

    def _agreed_stop(self, trainer: pl.Trainer) -> int:
        """The stop request all ranks act on: this process's own in one process, the largest of all under DDP."""
        if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return self._requested
        assert self._flag is not None
        self._flag.fill_(self._requested)
        torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        return int(self._flag.item())

    def _stop_if_requested(self, trainer: pl.Trainer) -> None:
        code = self._agreed_stop(trainer)
        if code != NO_STOP:
            self._requested = NO_STOP
            self.stopped_by = STOP_NAMES[code]
            raise stop_exception(code)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        done, total = epoch_position(trainer)
        if done % max(1, int(trainer.accumulate_grad_batches)) == 0 or done >= total:  # an optimizer step closed it
            self._stop_if_requested(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.world_size == 1:  # under DDP ranks hold different numbers of validation batches
            self._stop_if_requested(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_requested(trainer)  # before ModelCheckpoint saves the epoch's last.ckpt (it runs last)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        if self._submitit_handler is not None and self._requested == STOP_REQUEUE and trainer.is_global_zero:
            # came after the last batch boundary: let submitit act on it now
            self._requested = NO_STOP
            os.kill(os.getpid(), REQUEUE_SIGNAL)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        self.interrupted = True
        path = self.dirpath / "last.ckpt"
        done, total = epoch_position(trainer)
        check = next((c for c in trainer.callbacks if isinstance(c, NonFiniteLossCheck)), None)
        step = check.first_nonfinite_step() if check is not None else -1
        nonfinite = trainer.strategy.reduce_boolean_decision(step >= 0, all=False)  # the same answer on every rank
        if nonfinite:
            self.nonfinite_step = step
            what = (f"not saved: the loss became NaN/inf (step {step}); kept {path}" if path.is_file()
                    else "not saved: the loss became NaN/inf")
        elif trainer.training and 0 < done < total:
            trainer.save_checkpoint(path)  # every rank calls it: the barrier inside is reached by all together
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
