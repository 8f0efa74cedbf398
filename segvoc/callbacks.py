"""Lightning plug-ins for durability: atomic checkpoint files and a checkpoint on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file in the same folder, fsyncs, then renames over the target:
    a crash during a save never leaves a truncated ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class PreemptionCheckpoint(Callback):
    """On SIGTERM (pre-emption) or Ctrl-C: save ``checkpoints/last.ckpt`` and say how to resume, in one line."""

    def __init__(self, dirpath: str | Path, run_dir: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.run_dir = Path(run_dir)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"interrupted at step {trainer.global_step}: saved {path}; resume with: "
                  f"python -m segvoc.train resume={self.run_dir}", file=sys.stderr, flush=True)
