"""segvoc: Hydra + PyTorch Lightning experiments for semantic segmentation on PASCAL VOC 2012."""

__version__ = "0.4.0"
