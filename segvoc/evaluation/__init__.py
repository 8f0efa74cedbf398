"""Scoring a split: the confusion-matrix metric, whole/slide/TTA inference, and the prediction and confusion figures."""
