"""segvoc: Hydra + PyTorch Lightning experiments for semantic segmentation: PASCAL VOC 2012, or your own data."""

__version__ = "0.5.0"
