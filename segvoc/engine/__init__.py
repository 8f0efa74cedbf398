"""Training machinery: the one ``SegmentationTask``, the builders that make objects from config, checkpoints,
interrupts, the feature cache and performance settings."""
