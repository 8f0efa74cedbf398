"""Optuna journal files (``hydra.sweeper.storage=journal:<file>``) that survive a write cut short.

Optuna's ``JournalFileBackend`` appends one JSON record per line and reads the file line by line. A kill or a full
disk during an append leaves a torn last line: Optuna skips it, but the next append is glued onto it, the record it
carries is lost, and from the append after that on every read of the study fails with a ``JSONDecodeError``.

Here every append first drops a torn last line (``drop_torn_tail``), holding Optuna's own lock on the file (the same
``<file>.lock`` that Optuna's ``JournalFileSymlinkLock`` takes, so plain Optuna processes take turns with segvoc's),
and keeps the file as it was in ``<file>.torn-<time>``. A broken record that complete ones follow (the state a torn
line leaves once someone else appended after it) cannot be repaired safely: opening such a journal is refused in one
line (``StudyError``). Imported only where a journal is opened (it imports Optuna).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileSymlinkLock

from segvoc.errors import StudyError
from segvoc.utils import atomic_write

log = logging.getLogger("segvoc.optuna")
_CHUNK = 1 << 16


def _complete(line: bytes) -> bool:
    """Whether ``line`` is a whole journal record: a JSON object ending with its newline."""
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _last_line(path: Path) -> tuple[int, bytes]:
    """(offset, bytes) of the file's last line, its newline included when it has one; (0, b"") for an empty file."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = size - 1 if size else 0  # a newline at the very end closes the last line; it does not start it
        while start > 0:
            low = max(0, start - _CHUNK)
            f.seek(low)
            cut = f.read(start - low).rfind(b"\n")
            if cut >= 0:
                start = low + cut + 1
                break
            start = low
        f.seek(start)
        return start, f.read()


def drop_torn_tail(path: Path) -> int:
    """Cut a torn last record off journal ``path`` (no newline at its end, or not a JSON object), keeping the
    whole file first in ``<file>.torn-<time>``; the number of bytes dropped (0: the journal was whole). The caller
    holds the journal's lock, so no append is under way."""
    start, line = _last_line(path)
    if not line or _complete(line):
        return 0
    data = path.read_bytes()
    copy = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    atomic_write(copy, lambda f: f.write(data), binary=True)
    with open(path, "r+b") as f:
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: dropped a torn last record (%d bytes of a write cut short); the journal as it was is in %s",
                path, len(line), copy)
    return len(line)


def check_journal(path: Path) -> None:
    """Refuse (``StudyError``) a journal with a broken record that complete records follow; drop a torn last one.
    The caller holds the journal's lock."""
    first_bad, lines = 0, 0
    with open(path, "rb") as f:
        for lines, line in enumerate(f, start=1):  # noqa: B007 - the count is used after the loop
            if not first_bad and not _complete(line):
                first_bad = lines
    if first_bad and first_bad < lines:
        raise StudyError(f"{path}: line {first_bad} of {lines} is not a complete journal record and complete ones "
                         "follow it (a write cut short, then appended to), so Optuna cannot read this study; "
                         "restore the journal from a copy, or start another study with "
                         "hydra.sweeper.storage=journal:<new file>")
    if first_bad:
        drop_torn_tail(path)


class RepairingLock(JournalFileSymlinkLock):
    """Optuna's lock on a journal file (``JournalFileSymlinkLock``: ``<file>.lock``) that, once held, drops a torn
    last record before its holder appends."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = Path(path)

    def acquire(self) -> bool:
        super().acquire()
        try:
            drop_torn_tail(self.path)
        except BaseException:
            self.release()
            raise
        return True


def open_journal(path: Path) -> Any:
    """An Optuna ``JournalStorage`` on ``path`` whose appends repair a torn last record; a journal Optuna could not
    read is refused (``StudyError``)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    lock = JournalFileSymlinkLock(str(path))  # Optuna's lock alone: check_journal refuses what it cannot repair
    lock.acquire()
    try:
        check_journal(path)
    finally:
        lock.release()
    return JournalStorage(JournalFileBackend(str(path), lock_obj=RepairingLock(path)))
