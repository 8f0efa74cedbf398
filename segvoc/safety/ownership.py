"""Rule A, ownership: segvoc deletes or replaces only folders it created, and it can prove it.

Every folder segvoc creates and may later clear (a run directory, the synthetic data root, a cache folder) gets a
marker when it is created: ``.segvoc.json`` holding its kind. Every deletion goes through ``remove_owned``, which
checks the marker first; without it, the command stops with an ``OwnershipError`` of one line naming the folder and
the way out. Folders made by segvoc 0.3/0.4, before markers, are recognised by their own files (the ``legacy``
check a caller passes). ``shutil.rmtree`` is called nowhere else in segvoc (``tests/test_structure.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from segvoc.errors import OwnershipError
from segvoc.utils import write_json

MARKER = ".segvoc.json"
KINDS = ("run", "synthetic", "cache")
Legacy = Callable[[Path], bool]


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` (None when it has none, or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owned(folder: Path, kind: str, legacy: Legacy | None = None) -> bool:
    """Whether segvoc made ``folder`` as a ``kind`` folder: its marker says so, or (folders of segvoc 0.3/0.4,
    unmarked) ``legacy(folder)`` recognises it by its own files."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") == kind
    return legacy is not None and folder.is_dir() and legacy(folder)


def is_empty(folder: Path) -> bool:
    """Whether ``folder`` does not exist or holds nothing."""
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def claim(folder: Path, kind: str, foreign: Iterable[str] = (), legacy: Legacy | None = None,
          fix: str = "") -> bool:
    """Make ``folder`` a ``kind`` folder of segvoc's: create it with its marker, or accept it when it is already
    one. An existing folder without the marker is claimed only if it holds none of the names in ``foreign`` (what
    segvoc would later clear there, so that it never clears what it did not write); otherwise ``OwnershipError``.
    Returns True when the marker was written now."""
    folder = Path(folder)
    if owned(folder, kind, legacy):
        return False
    marker = read_marker(folder)
    if marker is not None:
        raise OwnershipError(f"{folder}: segvoc made it as a {marker.get('kind')} folder, not a {kind} folder; "
                             f"{fix or 'use another folder'}")
    clash = sorted(name for name in foreign if (folder / name).exists() or (folder / name).is_symlink())
    if clash:
        raise OwnershipError(f"{folder}: holds {', '.join(clash[:4])} that segvoc did not make (no {MARKER}); "
                             f"segvoc will not write or clear there: {fix or 'use a new or empty folder'}")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MARKER, {"kind": kind, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "host": socket.gethostname(), "pid": os.getpid(), "segvoc": _version()})
    return True


def _version() -> str:
    from segvoc import __version__

    return __version__


def check_owned(folder: Path, kind: str, legacy: Legacy | None = None, fix: str = "") -> None:
    """``OwnershipError`` unless segvoc made ``folder`` as a ``kind`` folder (``owned``)."""
    if not owned(folder, kind, legacy):
        raise OwnershipError(f"{folder}: not a {kind} folder segvoc made (no {MARKER}); nothing was deleted: "
                             f"{fix or 'use a new or empty folder'}")


def remove_owned(paths: Iterable[Path], folder: Path, kind: str, legacy: Legacy | None = None,
                 fix: str = "") -> list[Path]:
    """Delete ``paths`` (files, folders or links inside ``folder``), after checking that segvoc made ``folder``
    as a ``kind`` folder. A link is removed, never followed; a path outside ``folder`` is refused. Returns what
    was removed."""
    folder = Path(folder)
    check_owned(folder, kind, legacy, fix)
    removed = []
    for path in paths:
        path = Path(path)
        if not _inside(path, folder):
            raise OwnershipError(f"{path}: outside {folder}; segvoc deletes only inside folders it made")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (its parent folder, links resolved, is ``folder`` or below it)."""
    parent, top = Path(os.path.realpath(path.parent)), Path(os.path.realpath(folder))
    return parent == top or top in parent.parents


def replace_owned(new: Path, folder: Path, kind: str, legacy: Legacy | None = None, fix: str = "") -> None:
    """Put the complete folder ``new`` (made beside ``folder``, with its marker) in the place of ``folder``: an
    existing ``folder`` must be segvoc's ``kind`` folder (or empty) and is deleted first."""
    folder = Path(folder)
    if folder.exists() and not is_empty(folder):
        check_owned(folder, kind, legacy, fix)
    if folder.is_symlink() or folder.is_file():
        raise OwnershipError(f"{folder}: not a folder; {fix or 'use a new or empty folder'}")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(new, folder)


def remove_stale_temps(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete what segvoc's own atomic writes (``segvoc.utils.atomic_write``) left behind in ``folder`` when the
    process was killed mid-write: ``.<name>.*.tmp`` for each of ``names`` (glob patterns). Only the caller, holding
    the folder's lock (``segvoc.safety.run_lock``), may call this: no other writer is running there."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
                removed.append(tmp)
    return removed
