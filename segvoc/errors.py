"""The error types segvoc raises for problems a user can fix (rendered as one line, no traceback)."""

from __future__ import annotations


class SegvocError(Exception):
    """Base class: a user-fixable problem. The message names the file/key and the fix."""


class DatasetError(SegvocError):
    """Bad, missing or inconsistent data on disk (images, masks, split lists)."""


class WeightsError(SegvocError):
    """Pretrained weights or a checkpoint that cannot be found or do not fit the model."""


class ConfigError(SegvocError):
    """A configuration value that cannot work (wrong combination, bad path)."""


class NonFiniteLossError(SegvocError):
    """The training loss became NaN or infinite."""


class InterruptedRun(SegvocError):
    """Training was stopped by SIGTERM/SIGINT after saving a checkpoint to resume from."""


class ExportError(SegvocError):
    """A model could not be exported, or the exported file does not match PyTorch."""


class TrackerError(SegvocError):
    """An experiment tracker (MLflow, W&B) that cannot be reached or used as configured."""


class OwnershipError(SegvocError):
    """A folder segvoc would delete or replace that it cannot prove it created (no ownership marker)."""


class RunLockedError(SegvocError):
    """A run directory that another launch holds (its lock is taken)."""


class UntrustedConfigError(SegvocError):
    """A config read from a file (checkpoint, exported model) names a ``_target_`` outside the allowlist."""


class MissingExtraError(SegvocError):
    """A command needs an optional extra (``pip install 'segvoc[NAME]'``) that is not installed."""
