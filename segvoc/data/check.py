"""``python -m segvoc.data.check data.root=<dir>``: validate a whole VOC tree before a long run.

Checks the layout and split lists (as ``train`` does up front), then decodes every image and mask of every split
(as ``train`` does lazily), and prints ids per split, class pixel counts, and every problem found.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.data.synthetic import generate
from segvoc.data.tree_check import check_tree, print_summary


def check(cfg: DictConfig) -> dict[str, Any]:
    d = cfg.data
    if d.get("synthetic"):
        generate(d.root, **dict(d.synthetic))
    report = check_tree(d.root, d.train_split, d.test_fraction, d.split_seed, d.subset)
    print_summary(report, int(cfg.max_problems))
    return report


@hydra.main(version_base="1.3", config_path="../../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    run_app(check, cfg)


if __name__ == "__main__":
    main()
