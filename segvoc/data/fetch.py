"""Getting the standard VOC 2012 setup from nothing: download VOC (and SBD for ``train_aug``) with checksums,
extract, and build ``SegmentationClassAug`` + ``train_aug.txt`` (``segvoc.data.sbd``). Every step is resumable:
downloads go to a temporary name and are renamed when complete and verified, extractions and the conversion leave a
marker when done, and running it again does only what is missing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import tarfile
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn, track

from segvoc.data.sbd import build_marker, build_train_aug
from segvoc.errors import DatasetError

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
    An interrupted extraction has no marker, so the next call extracts again over the partial files."""
    marker = into / f".extracted-{archive.name}"
    if marker.is_file():
        return False
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in track(members, description=f"extracting {archive.name}", transient=True,
                                disable=len(members) < 200):
                tar.extract(member, into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{archive}: cannot extract ({type(exc).__name__}: {str(exc)[:120]}); delete it and run "
                           "again to download it anew") from None
    marker.write_text("done\n")
    return True


def prepare_tree(root: str | Path, urls: Mapping[str, str], md5: Mapping[str, str | None],
                 train_split: str = "train") -> Path:
    """Make ``root`` hold VOC 2012 (and, for ``train_split=train_aug``, ``SegmentationClassAug`` built from SBD):
    download, verify, extract and convert whatever is missing. Returns the ``VOC2012`` folder."""
    root = Path(root).expanduser()
    voc = root / "VOCdevkit" / "VOC2012"
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
    """An exclusive ``fcntl.flock`` on ``root/.segvoc-prepare.lock`` while the tree is prepared: a second launch
    sharing the data root (another rank under srun, a lab mate) waits, then finds the work done, instead of writing
    into the same ``.part`` download. The kernel drops the lock when its process dies, so a killed run never
    leaves it behind."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(url: str, md5: str | None, root: Path, present: Path) -> None:
    """Download and extract ``url`` into ``root`` unless ``present`` exists and no extraction of ours is unfinished
    (a tree extracted by hand, without the archive beside it, is used as it is)."""
    archive = root / "archives" / Path(url).name
    done = (root / f".extracted-{archive.name}").is_file()
    if done or (present.is_dir() and not archive.is_file()):
        return
    download(url, archive, md5)
    extract(archive, root)
