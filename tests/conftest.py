"""Shared fixtures: the real VOC samples in ../shared, a small synthetic tree, composed configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from segvoc.config import REPO_ROOT, compose

SHARED = REPO_ROOT.parent / "shared"
VOC_MINI = SHARED / "data" / "voc-mini" / "VOCdevkit" / "VOC2012"

# ``make test`` runs the files in parallel (pytest-xdist, one process per core): each process, and the runs its tests
# start in subprocesses (OMP_NUM_THREADS is inherited), then gets its share of the cores instead of all of them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def voc_mini() -> Path:
    """The four real VOC pairs; skipped in a user's clone without ../shared, a failure under CI=true."""
    if not VOC_MINI.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared VOC samples are missing at {VOC_MINI}")
        pytest.skip(f"shared VOC samples not found at {VOC_MINI} (clone with ../shared beside the repo)")
    return VOC_MINI


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic VOC tree (folder holding VOCdevkit), generated once per session."""
    from segvoc.data.synthetic import generate

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(root, num_train=24, num_val=16, height=60, width=80, seed=0)
    return root


@pytest.fixture(autouse=True)
def _close_mlflow_stores():
    """MLflow keeps one SQLAlchemy engine per database URI for the process (``SqlAlchemyStore._engine_map``) and
    its SQLite files open. A passed test's folder is deleted (``tmp_path_retention_policy``); a later test's new
    database can then get the deleted file's inode, which SQLite, still holding the old file, refuses ("attempt to
    write a readonly database"). Close and forget the engines after each test that opened one."""
    yield
    maps = [getattr(getattr(sys.modules.get(f"mlflow.store.{kind}.sqlalchemy_store"), "SqlAlchemyStore", None),
                    "_engine_map", None) for kind in ("tracking", "model_registry")]
    maps = [m for m in maps if m]
    if not maps:
        return
    for engines in maps:
        for engine in engines.values():
            engine.dispose()
        engines.clear()
    for name, attr in (("mlflow.tracking._tracking_service.utils", "_tracking_store_registry"),
                       ("mlflow.tracking._model_registry.utils", "_model_registry_store_registry")):
        registry = getattr(sys.modules.get(name), attr, None)
        if registry is not None:
            registry._get_store_with_resolved_uri.cache_clear()


def make_cfg(tmp_path: Path, *overrides: str, data_root: Path | None = None) -> DictConfig:
    """Compose the train config for a test run writing into ``tmp_path``."""
    ov = [f"paths.output_dir={tmp_path}", f"paths.output_root={tmp_path}/outputs", *overrides]
    if data_root is not None:
        ov.append(f"data.root={data_root}")
    cfg = compose(ov)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.fixture()
def smoke_cfg(tmp_path: Path, synthetic_root: Path):
    """Factory: a composed smoke config on the session's synthetic tree."""

    def _make(*overrides: str) -> DictConfig:
        return make_cfg(tmp_path, "data=synthetic", "debug=smoke", "data.image_size=64", "data.synthetic=null",
                        *overrides, data_root=synthetic_root)

    return _make
