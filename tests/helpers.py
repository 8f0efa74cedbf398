"""Test-only helpers that runs load through their config (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Send ``sig`` to this very process once, at a chosen place: after training step ``step`` (``where=train``),
    or during the first validation batch after it (``where=val``). A real signal through the real handlers, at a
    point a test can name instead of guessing it with a sleep. Only in a run started afresh, and with ``job`` set,
    only in that job of a sweep."""

    def __init__(self, step: int, sig: int = signal.SIGTERM, where: str = "train", job: int | None = None) -> None:
        self.step, self.sig, self.where, self.job = step, int(sig), where, job
        self.sent = False

    def _this_job(self) -> bool:
        from hydra.core.hydra_config import HydraConfig

        return self.job is None or int(HydraConfig.get().job.num) == self.job

    def _send(self, trainer: pl.Trainer) -> None:
        if not self.sent and not trainer.ckpt_path and self._this_job():  # never in a resumed run
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "train" and trainer.global_step == self.step:
            self._send(trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "val" and not trainer.sanity_checking and trainer.global_step >= self.step:
            self._send(trainer)
