"""Exporting a trained task to ONNX/TorchScript, and running exported files as a task."""
