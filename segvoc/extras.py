"""The optional extras (``pip install 'segvoc[NAME]'``, pyproject.toml): what each provides, and the one-line error
of a command that needs one that is not installed. Core segvoc (train, evaluate, predict, report) needs none."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from segvoc.errors import MissingExtraError

# extra -> the modules whose presence makes it installed; ``require`` imports and returns the first
EXTRAS: dict[str, tuple[str, ...]] = {
    "smp": ("segmentation_models_pytorch",),                     # model=smp, loss=lovasz
    "export": ("onnx", "onnxscript", "onnxruntime"),             # export format=onnx, evaluate/predict a .onnx
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),               # logger=mlflow (and `mlflow server`)
    "wandb": ("wandb",),                                         # logger=wandb
    "sweep": ("optuna", "cmaes"),                                # hparams_search=optuna (cmaes: sampler=cmaes)
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),  # hydra/launcher=slurm|local
}

# command-line choices Hydra acts on while composing or launching, before any segvoc code runs: group -> option ->
# extra (checked in sys.argv by ``exit_if_missing``)
HYDRA_CHOICES: dict[str, dict[str, str]] = {
    "hydra/launcher": {"slurm": "slurm", "local": "slurm", "submitit_slurm": "slurm", "submitit_local": "slurm"},
    "hparams_search": {"optuna": "sweep"},
    "hydra/sweeper": {"segvoc_optuna": "sweep"},
}


def require(extra: str, what: str) -> ModuleType:
    """The main module of ``extra`` (``EXTRAS``), imported; ``MissingExtraError`` naming ``what`` needs it and the
    pip command when any of the extra's modules is missing."""
    modules = EXTRAS[extra]
    try:
        found = all(importlib.util.find_spec(name) is not None for name in modules)
        if found:
            return importlib.import_module(modules[0])
    except ModuleNotFoundError as exc:
        raise _missing(extra, what) from exc
    raise _missing(extra, what)


def _missing(extra: str, what: str) -> MissingExtraError:
    return MissingExtraError(f"{what} needs the {extra} extra: pip install 'segvoc[{extra}]'")


def check_command_line(argv: Sequence[str]) -> None:
    """``require`` the extra of each Hydra choice in ``argv`` that needs one (``HYDRA_CHOICES``)."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        for option in value.split(","):  # a sweep over options: each one
            extra = HYDRA_CHOICES.get(key, {}).get(option.strip())
            if extra is not None:
                require(extra, f"{key}={option.strip()}")


def exit_if_missing(argv: Sequence[str] | None = None) -> None:
    """What an entry point calls before Hydra's ``main()``: a missing extra of a choice in ``argv`` (default:
    ``sys.argv``) is ``error: <message>`` on stderr and exit code 2, as ``segvoc.app.run_app`` reports errors."""
    try:
        check_command_line(sys.argv[1:] if argv is None else argv)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
