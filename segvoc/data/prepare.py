"""``python -m segvoc.data.prepare data.root=<dir> [data.train_split=train_aug]``: the standard VOC 2012 setup
from nothing, in one command.

Downloads what is missing (VOC 2012 trainval; SBD for ``train_aug``) from ``data.urls``, checks ``data.md5``,
extracts, builds ``SegmentationClassAug`` and ``train_aug.txt``, then checks the tree as ``segvoc.data.check`` does.
Running it again does only what is missing; an interrupted run is finished by the next one.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.data.fetch import prepare_tree
from segvoc.data.tree_check import check_configured


def prepare(cfg: DictConfig) -> dict[str, Any]:
    prepare_tree(cfg.data.root, cfg.data.urls, cfg.data.md5, cfg.data.train_split)
    return check_configured(cfg.data, int(cfg.max_problems))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_app(prepare, cfg)


if __name__ == "__main__":
    main()
