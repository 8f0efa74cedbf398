"""Getting the standard VOC 2012 setup from nothing: download VOC (and SBD for ``train_aug``) with checksums,
extract, and build ``SegmentationClassAug`` + ``train_aug.txt`` (``segvoc.data.sbd``). Every step is resumable:
downloads go to a temporary name and are renamed when complete and verified, extractions and the conversion leave a
marker when done, and running it again does only what is missing."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tarfile
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn, track

from segvoc.data.sbd import build_marker, build_train_aug
from segvoc.errors import DatasetError
from segvoc.utils import file_lock

log = logging.getLogger("segvoc.data")
CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    """The md5 hex digest of a file (read in 1 MiB chunks)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None = None) -> bool:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed when complete) and check its md5 (None: no check).

    An existing ``dest`` whose md5 matches is kept: returns False (nothing downloaded), True after a download. A
    cut-off transfer leaves only the ``.part`` file, which the next call starts over.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None or md5sum(dest) == md5:
            return False
        log.warning("%s: md5 differs from data.md5; downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn(f"downloading {dest.name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as bar:
                task = bar.add_task("download", total=total)
                received = 0
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    bar.update(task, advance=len(block))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")
    except OSError as exc:  # URLError, HTTPError, timeouts and cut-off transfers are all OSErrors
        raise DatasetError(f"{url}: download failed ({type(exc).__name__}: {str(exc)[:120]}); run the same command "
                           f"again to restart it, or put the file at {dest} by hand") from None
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DatasetError(f"{dest.name}: md5 {got} but data.md5 expects {md5}; the download is corrupt or not "
                               "the expected file: check data.urls, or set the md5 to null to skip the check")
    part.replace(dest)
    return True


def extract(archive: Path, into: Path) -> bool:
    """Extract a tar/tgz into ``into`` (with a progress bar) unless its marker says it was done; True if it ran.
    Every member is checked first (``check_members``): a crafted archive writes nothing. An interrupted extraction
    has no marker, so the next call extracts again over the partial files."""
    marker = into / f".extracted-{archive.name}"
    if marker.is_file():
        return False
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            check_members(archive, members)
            for member in track(members, description=f"extracting {archive.name}", transient=True,
                                disable=len(members) < 200):
                tar.extract(member, into, **_TAR_FILTER)
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{archive}: cannot extract ({type(exc).__name__}: {str(exc)[:120]}); delete it and run "
                           "again to download it anew") from None
    marker.write_text("done\n")
    return True


# tarfile's own "data" filter where this Python has it (3.12, and 3.8-3.11 since their 2023 security releases); it
# is a second line of defence only: check_members decides, whatever the Python version.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def check_members(archive: Path, members: Sequence[tarfile.TarInfo]) -> None:
    """Refuse the whole archive, before anything is extracted, if any member could write outside the folder it is
    extracted into or is not plain data: only regular files, folders, and links whose target stays below the
    link (relative, without ``..``) are allowed; names must be relative and without ``..``. The error is one line
    naming the archive and the first bad member."""
    for member in members:
        problem = _name_problem(member.name)
        if problem is None and member.issym():
            problem = _name_problem(member.linkname) and f"is a link to {member.linkname!r}, outside the folder"
        elif problem is None and member.islnk():
            problem = _name_problem(member.linkname) and f"is a hard link to {member.linkname!r}, outside the folder"
        elif problem is None and not (member.isreg() or member.isdir()):
            problem = f"is a {_KINDS.get(member.type, 'special file')}, not a regular file or folder"
        if problem is not None:
            raise DatasetError(f"{archive}: member {member.name!r} {problem}; refusing to extract it: this is not "
                               "the expected archive (check data.urls and data.md5, delete it, and run again)")


_KINDS = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


def _name_problem(name: str) -> str | None:
    """Why a member name (or link target) could leave the extraction folder; None when it cannot."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a '..' in its path"
    return None


def prepare_tree(root: str | Path, urls: Mapping[str, str], md5: Mapping[str, str | None],
                 train_split: str = "train") -> Path:
    """Make ``root`` hold VOC 2012 (and, for ``train_split=train_aug``, ``SegmentationClassAug`` built from SBD):
    download, verify, extract and convert whatever is missing. Returns the ``VOC2012`` folder."""
    root = Path(root).expanduser()
    voc = root / "VOCdevkit" / "VOC2012"
    if _complete(root, urls, train_split):
        return voc  # nothing to do: no lock either, so a complete read-only shared root works as it is
    with data_root_lock(root):
        _fetch(urls["voc"], md5.get("voc"), root, present=voc / "JPEGImages")
        if train_split == "train_aug" and not build_marker(voc).is_file():
            sbd = root / "benchmark_RELEASE" / "dataset"
            _fetch(urls["sbd"], md5.get("sbd"), root, present=sbd / "cls")
            build_train_aug(voc, sbd)
    return voc


LOCK_NAME = ".segvoc-prepare.lock"


@contextlib.contextmanager
def data_root_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root/.segvoc-prepare.lock`` (``segvoc.utils.file_lock``) while the tree is prepared:
    a second launch sharing the data root (another rank under srun, a lab mate) waits, then finds the work done,
    instead of writing into the same ``.part`` download. The kernel drops the lock when its process dies, so a
    killed run never leaves it behind."""
    with file_lock(root / LOCK_NAME, "data.root"):
        yield


def _complete(root: Path, urls: Mapping[str, str], train_split: str) -> bool:
    """True when ``prepare_tree`` has nothing to do (checked again under the lock when it has)."""
    voc = root / "VOCdevkit" / "VOC2012"
    if not _fetched(urls["voc"], root, voc / "JPEGImages"):
        return False
    return train_split != "train_aug" or build_marker(voc).is_file()


def _fetched(url: str, root: Path, present: Path) -> bool:
    """``url``'s archive was extracted into ``root``, or ``present`` exists and no extraction of ours is unfinished
    (a tree extracted by hand, without the archive beside it, is used as it is)."""
    archive = root / "archives" / Path(url).name
    return (root / f".extracted-{archive.name}").is_file() or (present.is_dir() and not archive.is_file())


def _fetch(url: str, md5: str | None, root: Path, present: Path) -> None:
    """Download and extract ``url`` into ``root`` unless it is there already (``_fetched``)."""
    if _fetched(url, root, present):
        return
    archive = root / "archives" / Path(url).name
    download(url, archive, md5)
    extract(archive, root)
