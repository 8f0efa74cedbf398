"""Small file helpers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from segvoc.errors import ConfigError


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def process_umask() -> int:
    """The process umask: read from ``/proc/self/status`` on Linux (no window in which another thread would create
    files under a different umask); elsewhere by setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``: a crash mid-write
    never leaves a truncated file, and readers see the old or the new content, nothing in between.

    The file gets the mode a plain ``open(path, "w")`` would give (0644 under umask 022), not ``mkstemp``'s 0600,
    so lab mates can read a run and share ``paths.cache_dir``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_beside(path: Path) -> Path:
    """A temporary file name beside ``path``, with its suffix, unique to this call (two exports to one file never
    share it); the caller creates the file (with the umask's mode), renames it over ``path``, or removes it."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/inf become null)."""
    atomic_write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def one_line(text: str, width: int = 240) -> str:
    """``text`` (an exception's message) on one line, shortened at a word boundary with `` …`` when longer than
    ``width``: never cut in the middle of a word."""
    return textwrap.shorten(" ".join(str(text).split()), width, placeholder=" …")


def files_key(paths: Sequence[str | Path]) -> str:
    """A short key of files' paths, sizes, modification and change times and inodes: changes when any file is
    replaced or edited, also by a copy that keeps the size and sets the old mtime back (``os.utime``, ``cp -p``,
    ``rsync -t``): the change time (ctime) of a write, rename or ``utime`` is the kernel's clock, which no file
    operation sets back. Costs one ``stat`` per file, no reading of the contents."""
    h = hashlib.sha1()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: str | Path, setting: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block: the one lock helper for every lock segvoc
    opens (decode cache, synthetic data, the data root), so that a shared folder works for every lab mate.

    The file is opened without truncating; created, if missing, with the mode the umask gives (``os.open``'s
    ``0o666``). It is opened read-write when we may (``flock`` on NFS needs it), else read-only: a lock file that
    belongs to someone else, or lies on a read-only mount, still locks (``flock`` works on a read-only descriptor
    on local file systems). The kernel drops the lock when the process dies. A lock that cannot be opened or taken
    is a one-line ``ConfigError`` naming ``path`` and ``setting`` (the key that chose the folder)."""
    path = Path(path)
    fd = -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise ConfigError(f"{path}: cannot lock ({exc.strerror or exc}); make {path.parent} writable for you, "
                          f"or set {setting} to a folder you can write") from None
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock_file(path: Path) -> int:
    """A descriptor of ``path``: read-write (created if missing), else read-only when only reading is allowed."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise exc from None
