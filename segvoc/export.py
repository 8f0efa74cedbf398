"""``python -m segvoc.export ckpt=<run dir or .ckpt> [format=onnx|torchscript] [output=<file>]``: ship a model.

Writes one self-contained file (contract in ``segvoc.deploy.exporting``), checks it against PyTorch on random odd-sized
images, prints the measured difference, and copies the run's ``MODEL_CARD.md`` beside it with an export section.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segvoc import config as _config  # noqa: F401  (registers resolvers)
from segvoc.app import run_app
from segvoc.config import choice
from segvoc.deploy.exported import export_format
from segvoc.deploy.exporting import FORMATS, ParityCheck, export, export_metadata
from segvoc.engine.builders import load_task
from segvoc.engine.checkpoint import read_checkpoint
from segvoc.errors import ConfigError
from segvoc.runs.model_card import CARD_NAME
from segvoc.utils import atomic_write_text

log = logging.getLogger("segvoc.export")


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


def parity_tolerance(cfg: DictConfig, model: str | None) -> dict[str, float]:
    """``conf/export.yaml``'s ``parity``: the report models' tolerance, or a reference model's looser one."""
    parity = cfg.parity
    looser = (parity.get("references") or {}).get(model) if model else None
    return {"max_abs_diff": float(looser if looser is not None else parity.max_abs_diff),
            "min_agreement": float(parity.min_agreement)}


def export_model(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt``; returns the written file."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: use onnx or torchscript")
    ckpt = Path(cfg.ckpt).expanduser()
    if export_format(ckpt) is not None:
        raise ConfigError(f"ckpt={ckpt}: already an exported file; pass the run dir or .ckpt it came from")
    run_dir = run_dir_of(ckpt)
    output = Path(cfg.output).expanduser() if cfg.output else run_dir / "export" / f"model{FORMATS[cfg.format]}"
    if output.suffix != FORMATS[cfg.format]:
        raise ConfigError(f"output={output}: a {cfg.format} file must end in {FORMATS[cfg.format]} (evaluate and "
                          "predict tell formats apart by it)")
    task, _ = load_task(ckpt, trusted=cfg.get("trusted_targets") or ())
    meta = export_metadata(task, ckpt, read_checkpoint(ckpt).get("epoch"))
    tolerance = parity_tolerance(cfg, choice(task.hparams.get("cfg") or {}, "model"))
    parity = export(task, output, cfg.format, meta, returns=cfg.returns, opset=int(cfg.opset), **tolerance)
    section = export_section(output, cfg.format, cfg.returns, int(cfg.opset), parity)
    card = run_dir / CARD_NAME
    text = card.read_text() if card.is_file() else f"# Model card\n\n(no {CARD_NAME} in {run_dir})\n"
    atomic_write_text(output.parent / CARD_NAME, text + section)
    print(f"{output}: {cfg.format}, max abs logit difference {parity.max_abs_diff:.3g}, argmax agreement "
          f"{parity.argmax_agreement:.6f} on random {', '.join(f'{h}x{w}' for h, w in parity.sizes)} images",
          flush=True)
    log.info("model card -> %s", output.parent / CARD_NAME)
    return output


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_app(export_model, cfg)


if __name__ == "__main__":
    main()
