"""Files others can read, launches that never collide, sweep bookkeeping and one-line errors (issue 24: 5, 6, 10)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from segvoc.app import run_app
from segvoc.config import CONF_DIR
from segvoc.errors import WeightsError
from segvoc.train import train


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Umask:
    def __init__(self, mask: int) -> None:
        self.mask = mask

    def __enter__(self) -> None:
        self.old = os.umask(self.mask)

    def __exit__(self, *exc: object) -> None:
        os.umask(self.old)


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_take_the_umask_mode(tmp_path, umask, expected):
    """``mkstemp`` makes 0600 files; an atomic write must give what ``open(path, "w")`` gives under the umask."""
    from segvoc.data.synthetic import generate
    from segvoc.utils import atomic_write, write_json

    with _Umask(umask):
        write_json(tmp_path / "m.json", {"a": 1})
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"), binary=True)
        plain = tmp_path / "plain.txt"
        plain.write_text("reference")
        voc = generate(tmp_path / "syn", num_train=2, num_val=2, height=20, width=24, seed=0)
    assert _mode(plain) == expected
    assert _mode(tmp_path / "m.json") == _mode(tmp_path / "b.bin") == expected
    # a generated tree in the shared cache: its folder (made with mkdtemp, 0700) and files are readable too
    assert _mode(tmp_path / "syn") == 0o777 & ~umask
    assert _mode(next((voc / "JPEGImages").iterdir())) == expected


@pytest.fixture(scope="module")
def run_under_umask_027(tmp_path_factory, synthetic_root) -> Path:
    """One weighted smoke run (class counts cached in paths.cache_dir) trained under umask 027."""
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("run027")
    cfg = make_cfg(out, "data=synthetic", "debug=smoke", "data.synthetic=null", "data.subset=6",
                   "trainer.max_epochs=2", "loss.class_weights=median_frequency",
                   f"paths.cache_dir={out}/cache", data_root=synthetic_root)
    with _Umask(0o027):
        train(cfg)
    return out


def test_run_files_and_shared_cache_are_group_readable(run_under_umask_027):
    run = run_under_umask_027
    files = [run / "metrics.json", run / "confusion.json", run / "MODEL_CARD.md", run / "class_weights.json",
             run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt", *(run / "cache").glob("*.json")]
    assert len(files) == 7
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o640) for f in files}


def test_best_checkpoint_holds_weights_and_config_last_the_full_state(run_under_umask_027, tmp_path):
    """best.ckpt: what scoring and export need, no optimizer state; last.ckpt: everything resume needs."""
    from segvoc.engine.builders import load_task

    best = torch.load(run_under_umask_027 / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run_under_umask_027 / "checkpoints" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and "lr_schedulers" not in best
    assert "optimizer_states" in last and "lr_schedulers" in last and "callbacks" in last
    assert "cfg" in best["hyper_parameters"] and isinstance(best["epoch"], int)
    weights = json.loads((run_under_umask_027 / "class_weights.json").read_text())["weights"]
    assert best["state_dict"]["criterion.weight"].tolist() == pytest.approx(weights)
    task, _ = load_task(run_under_umask_027 / "checkpoints" / "best.ckpt")  # what evaluate/export/report call
    assert task.criterion.class_weight.tolist() == pytest.approx(weights)
    size_best = (run_under_umask_027 / "checkpoints" / "best.ckpt").stat().st_size
    size_last = (run_under_umask_027 / "checkpoints" / "last.ckpt").stat().st_size
    print(f"CKPT SIZES best {size_best} B, last {size_last} B")
    assert size_best < 0.6 * size_last


def test_weights_only_checkpoint_as_ckpt_path_is_one_line(run_under_umask_027, smoke_cfg, tmp_path, capsys):
    cfg = smoke_cfg(f"paths.output_dir={tmp_path / 'new'}",
                    f"ckpt_path={run_under_umask_027 / 'checkpoints' / 'best.ckpt'}")
    with pytest.raises(SystemExit) as exc:
        run_app(train, cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ckpt_path=") and "weights only" in err and "last.ckpt" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_ckpt_path_typo_is_one_line_exit_2(smoke_cfg, tmp_path, capsys):
    typo = tmp_path / "runs" / "lats.ckpt"
    with pytest.raises(SystemExit) as exc:
        run_app(train, smoke_cfg(f"paths.output_dir={tmp_path / 'new'}", f"ckpt_path={typo}"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: ckpt_path={typo}: checkpoint not found; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
    assert not (tmp_path / "new").exists()


def test_truncated_checkpoint_message_keeps_whole_words(tmp_path):
    from segvoc.engine.checkpoint import read_checkpoint

    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:100])  # torch's cause is a 330-character paragraph
    with pytest.raises(WeightsError) as exc:
        read_checkpoint(cut)
    try:
        torch.load(cut, weights_only=True)
    except Exception as cause:  # noqa: BLE001 - the cause the message must carry
        words = str(cause).split()
    message = str(exc.value)
    assert "\n" not in message
    inner = message.split("(RuntimeError: ", 1)[1].rsplit("); is it a segvoc checkpoint", 1)[0]
    shown = inner.removesuffix(" …").split()
    assert shown == words[: len(shown)]  # every word shown is a whole word of the cause, in order
    assert "internal miniz error." in inner  # more than the 100 characters that used to be kept


def _run_dir(config_name: str, tmp_path: Path, *overrides: str) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, return_hydra_config=True,
                            overrides=[f"paths.output_root={tmp_path}", *overrides])
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_two_launches_in_one_second_get_their_own_directories(command, tmp_path):
    """Each launch composes its own config; the directory carries the same per-launch id as ``train``'s."""
    extra = ["ckpt=x"] + (["input=y"] if command == "predict" else [])
    first, second = (_run_dir(command, tmp_path, *extra) for _ in range(2))
    assert first.startswith(f"{tmp_path}/{command}/") and second.startswith(f"{tmp_path}/{command}/")
    assert first != second
    assert first.rsplit("_", 1)[1] != second.rsplit("_", 1)[1]  # distinct ids, not only a second that ticked


def test_export_temporary_names_are_unique(tmp_path, monkeypatch):
    """Two exports to the same file write different temporary files (one never replaces the other's half)."""
    from segvoc.config import compose
    from segvoc.deploy import exporting
    from segvoc.engine.builders import build_task

    seen: list[str] = []
    real = torch.jit.save

    def spy(module, path, *args, **kwargs):
        seen.append(str(path))
        return real(module, path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "save", spy)
    task = build_task(compose(["model=fcn_baseline", f"paths.output_dir={tmp_path}"]), pretrained=False).eval()
    target = tmp_path / "model.pt"
    for _ in range(2):
        exporting.export_torchscript(exporting.deploy_model(task), target, {"k": 1})
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(Path(p).parent == tmp_path and Path(p).name.startswith(".model.pt.") for p in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind


def test_failed_sweep_job_counts_as_finished_once_it_runs_again(smoke_cfg, tmp_path):
    """A job that failed after writing last.ckpt (FAILED.json beside it) and is rerun (resume=auto) is no
    longer listed as failed."""
    from segvoc.runs.sweep import FAILED_MARKER, summarize

    from segvoc.config import command_line_overrides

    job = tmp_path / "sweep" / "0_fcn_baseline"
    cfg = smoke_cfg(f"paths.output_dir={job}", "trainer.max_epochs=1")
    (job / ".hydra").mkdir(parents=True)  # what Hydra keeps of the job's launch
    OmegaConf.save(OmegaConf.create(command_line_overrides()), job / ".hydra" / "overrides.yaml")
    train(cfg)
    (job / "metrics.json").unlink()  # as if the job had died after its checkpoint
    (job / FAILED_MARKER).write_text(json.dumps({"error": "DatasetError: broken file"}))
    assert summarize(tmp_path / "sweep")["failed"] == {"0_fcn_baseline": "DatasetError: broken file"}
    train(smoke_cfg(f"paths.output_dir={job}", "trainer.max_epochs=1", "resume=auto"))
    assert summarize(tmp_path / "sweep") == {"ok": ["0_fcn_baseline"], "failed": {}}


def test_tree_check_lists_every_problem_in_one_pass(voc_mini, tmp_path):
    """A listed id with no files, an id without its image, a truncated JPEG and a mask holding 50: all four in
    one report, each missing file named."""
    import shutil

    import numpy as np
    from PIL import Image

    from segvoc.data.tree_check import check_tree

    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(voc_mini, root)
    with open(root / "ImageSets/Segmentation/train.txt", "a") as f:
        f.write("2007_999999\n")
    (root / "JPEGImages" / "2007_000032.jpg").unlink()
    jpg = root / "JPEGImages" / "2007_000033.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])
    mask_path = root / "SegmentationClass" / "2007_000042.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 50
    Image.fromarray(mask).save(mask_path)
    report = check_tree(tmp_path, progress=False)
    problems = report["problems"]
    assert len(problems) == 4, problems
    by_id = {i: [p for p in problems if i in p] for i in ("999999", "000032", "000033", "000042")}
    assert all(len(v) == 1 for v in by_id.values()), by_id
    assert "no JPEGImages/2007_999999.jpg and no SegmentationClass/2007_999999.png" in by_id["999999"][0]
    assert "no JPEGImages/2007_000032.jpg (" in by_id["000032"][0] and ".png" not in by_id["000032"][0]
    assert "JPEGImages/2007_000033.jpg: " in by_id["000033"][0] and "[50]" in by_id["000042"][0]
    assert report["counts"][0] > 0  # the one good pair (2007_000039) was still counted
