"""``segvoc.data.prepare`` against a local HTTP server serving generated archives in the real layouts: a VOC tar
(``VOCdevkit/VOC2012/...``) and an SBD tgz (``benchmark_RELEASE/dataset/{cls/*.mat, img, train.txt, val.txt}``)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from segvoc.data.fetch import download, prepare_tree
from segvoc.data.sbd import build_train_aug, sbd_mask
from segvoc.errors import DatasetError

VOC_TRAIN, VOC_VAL = ["2008_000001", "2008_000002"], ["2008_000003", "2008_000004"]
SBD_TRAIN, SBD_VAL = ["2008_000002", "2008_000005", "2008_000006"], ["2008_000003", "2008_000007"]
VOC_ONLY = ["2008_000008"]  # in VOC's trainval JPEGImages but in no segmentation list
EXPECTED_TRAIN_AUG = ["2008_000001", "2008_000002", "2008_000005", "2008_000006", "2008_000007"]


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(mask: np.ndarray) -> bytes:
    from segvoc.data.io import save_palette_mask

    buf = io.BytesIO()
    save_palette_mask(mask, buf)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _masks(ids: list[str], seed: int, borders: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in ids:
        m = rng.integers(0, 21, (24, 32), dtype=np.uint8)
        if borders:
            m[0, :] = 255  # VOC's own masks carry 255 borders, SBD's do not
        out[i] = m
    return out


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict:
    """The two archives, and the masks they hold."""
    root = tmp_path_factory.mktemp("archives")
    rng = np.random.default_rng(0)
    voc_masks = _masks(VOC_TRAIN + VOC_VAL, 1, borders=True)
    all_ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL + VOC_ONLY))
    with tarfile.open(root / "VOCtrainval_11-May-2012.tar", "w") as tar:
        base = "VOCdevkit/VOC2012"
        for i in all_ids:
            _add(tar, f"{base}/JPEGImages/{i}.jpg", _jpeg(rng))
        for i, m in voc_masks.items():
            _add(tar, f"{base}/SegmentationClass/{i}.png", _png(m))
        _add(tar, f"{base}/ImageSets/Segmentation/train.txt", ("\n".join(VOC_TRAIN) + "\n").encode())
        _add(tar, f"{base}/ImageSets/Segmentation/val.txt", ("\n".join(VOC_VAL) + "\n").encode())
    sbd_masks = _masks(SBD_TRAIN + SBD_VAL, 2, borders=False)
    with tarfile.open(root / "benchmark.tgz", "w:gz") as tar:
        base = "benchmark_RELEASE/dataset"
        for i, m in sbd_masks.items():
            buf = io.BytesIO()
            savemat(buf, {"GTcls": {"Segmentation": m, "Boundaries": np.zeros(21, object), "CategoriesPresent":
                                    np.unique(m).astype(np.uint8)}})
            _add(tar, f"{base}/cls/{i}.mat", buf.getvalue())
        _add(tar, f"{base}/train.txt", ("\n".join(SBD_TRAIN) + "\n").encode())
        _add(tar, f"{base}/val.txt", ("\n".join(SBD_VAL) + "\n").encode())
    md5 = {k: hashlib.md5((root / f).read_bytes()).hexdigest()
           for k, f in (("voc", "VOCtrainval_11-May-2012.tar"), ("sbd", "benchmark.tgz"))}
    return {"dir": root, "md5": md5, "voc_masks": voc_masks, "sbd_masks": sbd_masks}


class _Server:
    """A server on 127.0.0.1 for the test's duration; counts requests; ``cut`` makes it close mid-transfer."""

    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        self.cut = False
        self.slow = False  # send each file in 8 pieces over about 2 s
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(directory), **k)

            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                if server.cut:
                    data = (directory / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 3])  # then the connection closes
                    return
                if server.slow:
                    data = (directory / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    piece = -(-len(data) // 8)
                    for k in range(0, len(data), piece):
                        self.wfile.write(data[k:k + piece])
                        self.wfile.flush()
                        time.sleep(0.25)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(archives):
    s = _Server(archives["dir"])
    yield s
    s.close()


def _sources(server, archives, **md5) -> tuple[dict, dict]:
    urls = {"voc": f"{server.url}/VOCtrainval_11-May-2012.tar", "sbd": f"{server.url}/benchmark.tgz"}
    return urls, {**archives["md5"], **md5}


def test_fresh_prepare_builds_train_aug_and_a_second_run_downloads_nothing(tmp_path, server, archives):
    from segvoc.data.tree_check import check_dataset

    urls, md5 = _sources(server, archives)
    voc = prepare_tree(tmp_path, urls, md5, "train_aug")
    assert sorted(server.requests) == ["/VOCtrainval_11-May-2012.tar", "/benchmark.tgz"]
    ids = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert ids == EXPECTED_TRAIN_AUG  # (SBD train + SBD val + VOC train) - VOC val, sorted
    for i in ids:  # pixel for pixel: VOC's own mask where VOC has one, else the .mat
        built = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png"))
        expected = archives["voc_masks"][i] if i in archives["voc_masks"] else archives["sbd_masks"][i]
        assert np.array_equal(built, expected), i
        assert Image.open(voc / "SegmentationClassAug" / f"{i}.png").mode == "P"
    report = check_dataset({"root": voc, "train_split": "train_aug"}, progress=False)
    assert report["errors"] == [] and report["splits"]["train"] == len(EXPECTED_TRAIN_AUG)
    server.requests.clear()
    stamp = (voc / "SegmentationClassAug" / "2008_000005.png").stat().st_mtime_ns
    prepare_tree(tmp_path, urls, md5, "train_aug")
    assert server.requests == []  # everything was there and verified: nothing fetched, nothing rewritten
    assert (voc / "SegmentationClassAug" / "2008_000005.png").stat().st_mtime_ns == stamp


def test_md5_mismatch_is_one_line_naming_file_and_both_sums(tmp_path, server, archives):
    urls, md5 = _sources(server, archives, voc="0" * 32)
    with pytest.raises(DatasetError) as err:
        prepare_tree(tmp_path, urls, md5)
    msg = str(err.value)
    assert msg.startswith("VOCtrainval_11-May-2012.tar: md5 ") and archives["md5"]["voc"] in msg and "0" * 32 in msg
    assert "\n" not in msg
    assert not (tmp_path / "archives" / "VOCtrainval_11-May-2012.tar").exists()  # never kept under its final name


def test_cut_off_download_restarts_cleanly(tmp_path, server, archives):
    urls, md5 = _sources(server, archives)
    server.cut = True
    with pytest.raises(DatasetError, match=r"download failed .*run the same command again"):
        prepare_tree(tmp_path, urls, md5)
    assert not (tmp_path / "archives" / "VOCtrainval_11-May-2012.tar").exists()
    assert (tmp_path / "archives" / "VOCtrainval_11-May-2012.tar.part").exists()
    server.cut = False
    voc = prepare_tree(tmp_path, urls, md5)
    assert (voc / "JPEGImages" / "2008_000001.jpg").is_file()
    assert not (tmp_path / "archives" / "VOCtrainval_11-May-2012.tar.part").exists()


def test_interrupted_conversion_is_finished_by_the_next_run(tmp_path, server, archives, monkeypatch):
    import segvoc.data.sbd as sbd

    urls, md5 = _sources(server, archives)
    calls = []
    real = sbd.sbd_mask

    def dies_on_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the conversion
        return real(path)

    monkeypatch.setattr(sbd, "sbd_mask", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_tree(tmp_path, urls, md5, "train_aug")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    assert not (voc / "SegmentationClassAug" / ".complete").exists()
    assert not list((voc / "SegmentationClassAug").glob(".*.tmp"))  # no half-written PNG
    monkeypatch.setattr(sbd, "sbd_mask", real)
    server.requests.clear()
    prepare_tree(tmp_path, urls, md5, "train_aug")
    assert server.requests == []  # archives kept; only the conversion was finished
    assert (voc / "SegmentationClassAug" / ".complete").is_file()
    for i in EXPECTED_TRAIN_AUG:
        expected = archives["voc_masks"].get(i, archives["sbd_masks"].get(i))
        assert np.array_equal(np.asarray(Image.open(voc / "SegmentationClassAug" / f"{i}.png")), expected)


def test_sbd_mat_is_read_as_class_indices(tmp_path):
    m = np.arange(12, dtype=np.uint8).reshape(3, 4)
    savemat(tmp_path / "x.mat", {"GTcls": {"Segmentation": m}})
    assert np.array_equal(sbd_mask(tmp_path / "x.mat"), m)
    (tmp_path / "bad.mat").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.mat: cannot read SBD mask"):
        sbd_mask(tmp_path / "bad.mat")
    assert build_train_aug.__doc__  # the conversion is public API of segvoc.data.sbd


def test_unreachable_server_is_one_actionable_line(tmp_path):
    with pytest.raises(DatasetError) as err:
        download("http://127.0.0.1:9/VOCtrainval_11-May-2012.tar", tmp_path / "a.tar")
    msg = str(err.value)
    assert "download failed" in msg and "run the same command again" in msg and "\n" not in msg


@pytest.mark.slow
def test_prepare_cli_and_train_download_use_the_same_code(tmp_path, server, archives):
    import subprocess
    import sys

    from segvoc.config import REPO_ROOT

    urls, _ = _sources(server, archives)
    common = [f"data.root={tmp_path}", f"data.urls.voc={urls['voc']}", f"data.urls.sbd={urls['sbd']}",
              f"data.md5.voc={archives['md5']['voc']}", "data.md5.sbd=null", "data.train_split=train_aug",
              f"paths.output_root={tmp_path / 'out'}"]
    r = subprocess.run([sys.executable, "-m", "segvoc.data.prepare", *common], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no errors found" in r.stdout and f"train {len(EXPECTED_TRAIN_AUG)}" in r.stdout
    server.requests.clear()
    train = [sys.executable, "-m", "segvoc.train", *common, "data.download=true", "debug=smoke",
             "trainer.max_epochs=1", "data.image_size=32", "logger=none", "trainer.enable_progress_bar=false",
             f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(train, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert server.requests == []  # the prepared tree is complete: training downloads nothing
    assert (tmp_path / "run" / "splits" / "train.txt").read_text().split() == EXPECTED_TRAIN_AUG


def test_two_launches_sharing_a_data_root_download_once(tmp_path, server, archives):
    """Two processes (two ranks under srun, or two users) prepare the same data root at the same moment: the file
    lock makes the second wait and then find the tree done, instead of writing into the same ``.part`` file."""
    from segvoc.data.tree_check import check_dataset

    urls, md5 = _sources(server, archives)
    server.slow = True  # a download that takes ~2 s: both processes are inside it together without the lock
    root, go = tmp_path / "data", tmp_path / "go"
    script = ("import sys, time, pathlib; from segvoc.data.fetch import prepare_tree\n"
              "pathlib.Path(sys.argv[1]).write_text('ready')\n"
              "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
              f"prepare_tree({str(root)!r}, {urls!r}, {md5!r}, 'train')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{k}"), str(go)],
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a process died before starting"
        time.sleep(0.05)
    go.write_text("go")  # both start preparing at once
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert server.requests == ["/VOCtrainval_11-May-2012.tar"]  # one download; the other launch found it done
    archive = root / "archives" / "VOCtrainval_11-May-2012.tar"
    assert hashlib.md5(archive.read_bytes()).hexdigest() == archives["md5"]["voc"]
    assert not list((root / "archives").glob("*.part"))
    assert check_dataset({"root": root / "VOCdevkit" / "VOC2012"}, progress=False)["errors"] == []


def _tar_with(path: Path, crafted: tarfile.TarInfo | None) -> Path:
    """A tar holding one ordinary file, then ``crafted`` (a member with no data)."""
    with tarfile.open(path, "w") as tar:
        _add(tar, "VOCdevkit/VOC2012/ok.txt", b"ok")
        if crafted is not None:
            tar.addfile(crafted)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


CRAFTED = {
    "absolute": lambda out: _member(f"{out}/abs.txt"),
    "dotdot": lambda out: _member("VOCdevkit/../../outside/up.txt"),
    "symlink out": lambda out: _member("VOCdevkit/evil", tarfile.SYMTYPE, "../../outside"),
    "symlink absolute": lambda out: _member("VOCdevkit/evil", tarfile.SYMTYPE, str(out)),
    "hard link out": lambda out: _member("VOCdevkit/evil", tarfile.LNKTYPE, "../outside/x"),
    "fifo": lambda out: _member("VOCdevkit/pipe", tarfile.FIFOTYPE),
    "device": lambda out: _member("VOCdevkit/null", tarfile.CHRTYPE),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_archive_member_is_refused_before_anything_is_extracted(kind, tmp_path, monkeypatch):
    """Every member is checked before the first is extracted, whatever tarfile's own filter does: here it lets
    everything through, as the filters of Python releases before the 2025 tarfile fixes did for crafted members."""
    from segvoc.data.fetch import extract

    real = tarfile.TarFile.extract
    monkeypatch.setattr(tarfile.TarFile, "extract",
                        lambda self, member, path="", **kw: real(self, member, path, filter="fully_trusted"))
    outside = tmp_path / "outside"
    crafted = CRAFTED[kind](outside)
    archive = _tar_with(tmp_path / "VOCtrainval_11-May-2012.tar", crafted)
    with pytest.raises(DatasetError) as err:
        extract(archive, tmp_path / "root")
    msg = str(err.value)
    assert msg.startswith(f"{archive}: member {crafted.name!r} ") and "\n" not in msg, msg
    assert not outside.exists() and not (tmp_path / "root" / "VOCdevkit").exists()  # nothing at all was written


def test_archive_with_files_folders_and_links_that_stay_inside_extracts(tmp_path):
    from segvoc.data.fetch import extract

    archive = _tar_with(tmp_path / "a.tar", _member("VOCdevkit/VOC2012/alias.txt", tarfile.SYMTYPE, "ok.txt"))
    assert extract(archive, tmp_path / "root")
    assert (tmp_path / "root" / "VOCdevkit" / "VOC2012" / "alias.txt").read_text() == "ok"


def test_complete_tree_on_a_read_only_shared_root_needs_no_lock():
    """data.download=true on a complete tree that another user owns (not root: made read-only): nothing to do,
    so no lock file either (opening one there was a PermissionError with a traceback)."""
    import shutil

    from segvoc.data.fetch import LOCK_NAME
    from segvoc.data.sbd import build_marker
    from tests.helpers import lab_mate, shared_folder

    root = shared_folder()
    try:
        voc = root / "VOCdevkit" / "VOC2012"
        (voc / "JPEGImages").mkdir(parents=True)  # extracted by hand, no archive beside it
        build_marker(voc).parent.mkdir()
        build_marker(voc).write_text("done\n")
        urls = {"voc": "http://127.0.0.1:9/VOCtrainval_11-May-2012.tar", "sbd": "http://127.0.0.1:9/benchmark.tgz"}
        if os.geteuid() != 0:
            for folder in (voc / "SegmentationClassAug", voc / "JPEGImages", voc, voc.parent, root):
                folder.chmod(0o555)
        body = "\n".join(f"print(prepare_tree(sys.argv[1], {urls!r}, {{}}, {split!r}))" for split in ("train",
                                                                                                  "train_aug"))
        proc = lab_mate("from segvoc.data.fetch import prepare_tree", body, str(root))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert out.split() == [str(voc)] * 2
        assert not (root / LOCK_NAME).exists()
    finally:
        for folder in (root, *root.rglob("*")):
            folder.chmod(0o755)
        shutil.rmtree(root)
