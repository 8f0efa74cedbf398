"""The model card that travels with an exported file: the run's ``MODEL_CARD.md`` plus a section on the export."""

from __future__ import annotations

from pathlib import Path

from segvoc.deploy.exporting import ParityCheck
from segvoc.utils import atomic_write_text


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    if ckpt.is_dir():
        return ckpt
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def export_section(path: Path, fmt: str, returns: str, opset: int, parity: ParityCheck) -> str:
    """The model card's section about one exported file."""
    sizes = ", ".join(f"{h}x{w}" for h, w in parity.sizes)
    return (f"\n## Export: `{path.name}`\n\n"
            f"- format {fmt}" + (f" (opset {opset})" if fmt == "onnx" else "") + f", output `{returns}`\n"
            "- input `images`: uint8 RGB (N, 3, H, W), any N, H, W; normalisation and padding inside\n"
            f"- parity with PyTorch on random images {sizes} (batch 2): max abs logit difference "
            f"{parity.max_abs_diff:.3g}, argmax agreement {parity.argmax_agreement:.6f} (pixels whose top two logits "
            f"tie within the tolerance left out: {parity.tied_fraction:.2g})\n")


def write_export_card(card: Path, output: Path, fmt: str, returns: str, opset: int, parity: ParityCheck) -> Path:
    """The run's model card ``card`` (or a stub naming it, when missing) with the export section, written under
    the same name beside ``output``; returns its path."""
    text = card.read_text() if card.is_file() else f"# Model card\n\n(no {card.name} in {card.parent})\n"
    atomic_write_text(output.parent / card.name, text + export_section(output, fmt, returns, opset, parity))
    return output.parent / card.name
