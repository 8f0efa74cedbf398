"""Rule B, one owner per run directory: a launch holds an exclusive ``flock`` on ``<run dir>/.segvoc.lock`` for its
whole life. The kernel releases it when the process ends, however it ends (SIGKILL included), so a lock is never
left behind; a second launch into a held directory is refused in one line naming the holder (PID and host)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

from segvoc.errors import RunLockedError
from segvoc.utils import process_umask

LOCK_NAME = ".segvoc.lock"
_held: dict[str, int] = {}  # run dir -> the descriptor this process holds (kept open for the process's life)


def holder_text(run_dir: Path) -> str:
    """What the lock file says about its holder (``pid 123 on host x since ...``), or ``unknown``."""
    try:
        return (Path(run_dir) / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(run_dir: Path) -> None:
    """Take the run directory's lock for the rest of this process's life (again: a no-op); ``RunLockedError`` when
    another process holds it. The lock file is opened without truncating, with the umask's mode."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~process_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise RunLockedError(f"{run_dir}: another launch is running in it ({holder_text(run_dir)}); wait for it to "
                             "end, or pick another hydra.run.dir") from None
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    text = f"pid {os.getpid()} on host {socket.gethostname()} since {stamp}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    _held[key] = fd


def held(run_dir: Path) -> bool:
    """Whether this process holds the lock of ``run_dir``."""
    return str(Path(run_dir).resolve()) in _held


def is_locked(run_dir: Path) -> bool:
    """Whether some other process holds the lock of ``run_dir`` now (reading only: nothing is created)."""
    path = Path(run_dir) / LOCK_NAME
    if held(run_dir) or not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def release(run_dir: Path) -> None:
    """Give the lock back before the process ends (tests; a process that trains several runs in turn)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)
