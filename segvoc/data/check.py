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
from segvoc.data.tree_check import check_configured


def check(cfg: DictConfig) -> dict[str, Any]:
    if cfg.data.get("synthetic"):
        generate(cfg.data.root, **dict(cfg.data.synthetic))
    return check_configured(cfg.data, int(cfg.max_problems))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    run_app(check, cfg)


if __name__ == "__main__":
    main()
