"""Config helpers: OmegaConf resolvers, the conf/ location, and composing configs outside ``@hydra.main``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
if not OmegaConf.has_resolver("run_dir"):
    # ${run_dir:${resume},<new dir>}: the run being resumed (resume=<dir>), else a new directory (also for
    # resume=auto, which looks for an unfinished run in the directory it is given)
    OmegaConf.register_new_resolver(
        "run_dir", lambda resume, new: new if resume in (None, "", "null", "None", "auto") else resume)
if not OmegaConf.has_resolver("config_subdir"):
    # where Hydra saves this launch's config: .hydra/ in a new run directory; .hydra_resume/ where a run already
    # saved its .hydra/ (resumed, requeued, or re-run sweep jobs), so the original config is never overwritten
    OmegaConf.register_new_resolver(
        "config_subdir", lambda out: ".hydra_resume" if (Path(out) / ".hydra" / "config.yaml").is_file() else ".hydra")
if not OmegaConf.has_resolver("run_id"):
    # a token for this launch, so two runs started in the same second never share a directory: SLURM's job (and
    # array task) id when there is one, else a random one; cached, so one process always sees the same value
    OmegaConf.register_new_resolver("run_id", lambda: _run_id(), use_cache=True)
if not OmegaConf.has_resolver("optuna_study"):
    # ${optuna_study:${name},${hydra:overrides.task},${hydra.sweeper.params}}: a study named by everything that
    # defines the search (segvoc.config.search_definition), so a smoke search and a real one never share a study
    OmegaConf.register_new_resolver(
        "optuna_study", lambda name, task, params: f"{name}-{search_key(search_definition(task, params))}")

# overrides that change how a launch runs, not what a search explores
_LAUNCH_KEYS = ("hydra", "resume", "overwrite", "traceback", "hparams_search")


def search_definition(task_overrides: Any, params: Any) -> dict[str, Any]:
    """What defines an Optuna search: the command-line overrides that are not search parameters (nor ``hydra.*``,
    ``resume``, ``overwrite``), in canonical form and sorted, and the search space (``hydra.sweeper.params`` plus
    sweeps typed on the command line) as text. Equal in the sweeper and in its jobs (where the parameters have
    values and Hydra has re-written the other overrides, e.g. ``false`` as ``False``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = {str(k): str(v) for k, v in (OmegaConf.to_container(params) if isinstance(params, DictConfig)
                                         else dict(params or {})).items()}
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides or []])
    for ov in parsed:
        if ov.is_sweep_override():
            space.setdefault(ov.get_key_element(), str(ov.input_line).split("=", 1)[1])
    kept: dict[str, str] = {}  # by key: the last one counts, as in Hydra (a job sees only that one)
    for ov in parsed:
        key = ov.get_key_element().lstrip("+~").replace("/", ".")
        if key in space or key.split(".")[0] in _LAUNCH_KEYS:
            continue
        kept.pop(key, None)
        kept[key] = f"{ov.get_key_element()}={ov.get_value_element_as_str()}"
    return {"overrides": sorted(kept.values()), "params": dict(sorted(space.items()))}


def search_key(definition: dict[str, Any]) -> str:
    """An 8-character digest of a search definition."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:8]


def _run_id() -> str:
    import os
    import uuid

    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"j{job}" + (f"_{task}" if task else "")
    return uuid.uuid4().hex[:6]


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, without running an app (tests, notebooks).

    ``paths.output_dir`` must then be given as an override, since no Hydra run directory exists.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.*} resolve as in a run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def choice(cfg: DictConfig, group: str) -> str | None:
    """The option picked in config group ``group`` (``cfg.choices``; the group's ``name`` key in 0.1 configs)."""
    picked = (cfg.get("choices") or {}).get(group)
    return str(picked) if picked is not None else (cfg.get(group) or {}).get("name")


def command_line_overrides() -> list[str]:
    """The overrides the user typed for this Hydra run (empty outside ``@hydra.main``)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def stored_overrides(run_dir: Path) -> list[str] | None:
    """The overrides the run in ``run_dir`` was launched with (its ``.hydra/overrides.yaml``), or None."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else None


def carry_overrides(stored: DictConfig, composed: DictConfig, allowed: tuple[str, ...], refusal: str,
                    overrides: list[str] | None = None) -> DictConfig:
    """Apply what the user typed to a stored run config (a checkpoint's), taking values from ``composed``.

    A group override (``trainer=gpu``) replaces that whole node; a key override (``trainer.max_epochs=50``) sets
    that key; a deletion (``~callbacks.early_stopping``) deletes it. Keys under ``allowed`` (prefixes such as
    ``trainer`` or ``data.root``) are applied; ``hydra.*`` and ``resume``/``overwrite`` are ignored; any other key
    is a ``ConfigError`` naming it, followed by ``refusal``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from segvoc.errors import ConfigError

    out = stored.copy()
    given = command_line_overrides() if overrides is None else overrides
    for ov in OverridesParser.create().parse_overrides(given):
        key = ov.key_or_group.replace("/", ".")
        if key.split(".")[0] in ("hydra", "resume", "overwrite"):
            continue
        if not any(key == a or key.startswith(a + ".") for a in allowed):
            raise ConfigError(f"{ov.input_line}: {key} cannot change here; {refusal}")
        if ov.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(out, parent_key) if parent_key else out
            if isinstance(parent, DictConfig) and leaf in parent:
                with open_dict(parent):
                    del parent[leaf]
            continue
        value = OmegaConf.select(composed, key)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        with open_dict(out):
            OmegaConf.update(out, key, value, merge=False, force_add=True)
    return out


# The numeric keys a user types, with what each accepts: (key, smallest value, also accepted, what it is).
# ``check_values`` answers a bad one with one line; keys a command does not have are skipped.
_WHOLE = "a whole number"
NUMERIC_KEYS: tuple[tuple[str, float, tuple, str, str], ...] = (
    ("data.batch_size", 1, (), _WHOLE, "images per training batch"),
    ("data.eval_batch_size", 1, ("auto",), _WHOLE, "images per val/test batch"),
    ("data.num_workers", 0, ("auto",), _WHOLE, "DataLoader worker processes"),
    ("data.image_size", 1, (), _WHOLE, "the training crop side in pixels"),
    ("data.subset", 1, (None,), _WHOLE, "the first N ids of each split"),
    ("data.num_classes", 1, (), _WHOLE, "classes"),
    ("trainer.max_epochs", 1, (None,), _WHOLE, "epochs to train; -1 would train forever"),
    ("trainer.min_epochs", 0, (None,), _WHOLE, "epochs before early stopping may stop"),
    ("trainer.max_steps", 1, (-1,), _WHOLE, "optimizer steps to train (-1: no limit)"),
    ("trainer.accumulate_grad_batches", 1, (), _WHOLE, "batches per optimizer step"),
    ("trainer.num_nodes", 1, (), _WHOLE, "machines"),
    ("trainer.log_every_n_steps", 1, (), _WHOLE, "steps between log points"),
    ("trainer.check_val_every_n_epoch", 1, (None,), _WHOLE, "epochs between validations"),
    ("trainer.num_sanity_val_steps", 0, (-1,), _WHOLE, "validation batches before training (-1: all)"),
    ("optimizer.lr", 0, (), "a number", "the learning rate"),
    ("optimizer.weight_decay", 0, (), "a number", "the weight decay"),
    ("infer.window", 1, (), _WHOLE, "the sliding window side in pixels"),
    ("infer.stride", 1, (None,), _WHOLE, "the sliding window step in pixels"),
    ("infer.max_pixels", 1, (), _WHOLE, "the image size above which infer.mode=auto slides"),
    ("max_side", 1, (), _WHOLE, "the longest image side predict runs at"),
    ("max_problems", 0, (), _WHOLE, "problems listed in full"),
    ("log_images", 0, (), _WHOLE, "validation images in the TensorBoard grid"),
)
_POSITIVE = ("optimizer.lr",)  # > smallest, not >=


def check_values(cfg: DictConfig) -> None:
    """One place for the keys a user types: a missing mandatory value (``???``) or a numeric key out of range
    (``NUMERIC_KEYS``, plus ``data.test_fraction``) is a ``ConfigError`` of one line naming key, value and fix.
    Every entry point calls it (through ``segvoc.app.run_app``, and per job in a sweep) before any work."""
    from segvoc.errors import ConfigError

    for key in sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"{key} is required: add {key}=<value> to the command (see the comment on {key} in "
                          f"{_config_file()})")
    for key, low, also, kind, what in NUMERIC_KEYS:
        value = _value(cfg, key)
        if value is _ABSENT or any(value == a and type(value) is type(a) for a in also):
            continue
        whole = kind == _WHOLE
        number = isinstance(value, int | float) and not isinstance(value, bool) and (not whole or
                                                                                       float(value).is_integer())
        ok = number and (value > low if key in _POSITIVE else value >= low)
        if not ok:
            bound = f"> {low}" if key in _POSITIVE else f">= {low}"
            extra = "".join(f" or {'null' if a is None else a}" for a in also)
            raise ConfigError(f"{key}={_show(value)}: must be {kind} {bound}{extra} ({what})")
    fraction = _value(cfg, "data.test_fraction")
    if fraction is not _ABSENT and not (isinstance(fraction, int | float) and not isinstance(fraction, bool)
                                        and 0 <= fraction < 1):
        raise ConfigError(f"data.test_fraction={_show(fraction)}: must be a number in [0, 1) (the share of "
                          "official val held out as test)")


_ABSENT = object()


def _config_file() -> str:
    from hydra.core.hydra_config import HydraConfig

    return f"conf/{HydraConfig.get().job.config_name}.yaml" if HydraConfig.initialized() else "conf/"


def _value(cfg: DictConfig, key: str) -> object:
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - a key this command cannot resolve is checked where it is used
        return _ABSENT
    return node


def _show(value: object) -> str:
    return "null" if value is None else str(value)
