"""segvoc: Hydra + PyTorch Lightning experiments for semantic segmentation on PASCAL VOC 2012."""

import logging
import warnings

__version__ = "0.1.0"

# Quiet two messages from Lightning 2.6 that every run would print and no user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage())
