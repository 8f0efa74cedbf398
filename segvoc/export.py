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
from segvoc.deploy.export_card import run_dir_of, write_export_card
from segvoc.deploy.exported import export_format
from segvoc.deploy.exporting import FORMATS, export, export_metadata, parity_tolerance
from segvoc.engine.builders import load_task
from segvoc.engine.checkpoint import read_checkpoint
from segvoc.errors import ConfigError
from segvoc.runs.model_card import CARD_NAME

log = logging.getLogger("segvoc.export")


def export_model(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt``; returns the written file."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: use onnx or torchscript")
    ckpt = Path(cfg.ckpt).expanduser()
    if export_format(ckpt) is not None:
        raise ConfigError(f"ckpt={ckpt}: already an exported file; pass the run dir or .ckpt it came from")
    suffix = FORMATS[cfg.format]
    output = Path(cfg.output).expanduser() if cfg.output else run_dir_of(ckpt) / "export" / f"model{suffix}"
    if output.suffix != FORMATS[cfg.format]:
        raise ConfigError(f"output={output}: a {cfg.format} file must end in {FORMATS[cfg.format]} (evaluate and "
                          "predict tell formats apart by it)")
    task, _ = load_task(ckpt, trusted=cfg.get("trusted_targets") or ())
    meta = export_metadata(task, ckpt, read_checkpoint(ckpt).get("epoch"))
    tolerance = parity_tolerance(cfg, choice(task.hparams.get("cfg") or {}, "model"))
    parity = export(task, output, cfg.format, meta, returns=cfg.returns, opset=int(cfg.opset), **tolerance)
    card = write_export_card(run_dir_of(ckpt) / CARD_NAME, output, cfg.format, cfg.returns, int(cfg.opset), parity)
    print(f"{output}: {cfg.format}, max abs logit difference {parity.max_abs_diff:.3g}, argmax agreement "
          f"{parity.argmax_agreement:.6f} on random {', '.join(f'{h}x{w}' for h, w in parity.sizes)} images",
          flush=True)
    log.info("model card -> %s", card)
    return output


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_app(export_model, cfg)


if __name__ == "__main__":
    main()
