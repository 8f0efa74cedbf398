"""VOC 2012 data: folder layout, image/mask io, transforms, samplers, the DataModule, the synthetic set."""
