"""The exported file formats and their metadata key: shared by the writer (``exporting``) and reader (``exported``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_KEY = "segvoc"          # ONNX metadata_props key / TorchScript extra file name (JSON)


def export_format(path: str | Path) -> str | None:
    """``onnx`` / ``torchscript`` for an exported file (by suffix), None for anything else (checkpoints)."""
    suffix = Path(str(path)).suffix.lower()
    return next((fmt for fmt, ext in FORMATS.items() if ext == suffix), None)



@contextlib.contextmanager
def torchscript_quiet() -> Iterator[None]:
    """Silence torch 2.14's deprecation notices for ``torch.jit`` (and only those): TorchScript files are still
    what C++ (libtorch) deployments load, and this format is opt-in (``format=torchscript``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield
