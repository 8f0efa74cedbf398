"""Measuring segvoc (``python -m segvoc.bench``, ``make bench``, ``make gpu-check``): speed, host syncs, the GPU
check. Nothing on the training path imports this folder."""
