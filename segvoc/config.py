"""Config helpers: OmegaConf resolvers, the conf/ location, and composing configs outside ``@hydra.main``."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
if not OmegaConf.has_resolver("run_dir"):
    # ${run_dir:${resume},<new dir>}: the run being resumed (resume=<dir>), else a new directory (also for
    # resume=auto, which looks for an unfinished run in the directory it is given)
    OmegaConf.register_new_resolver(
        "run_dir", lambda resume, new: new if resume in (None, "", "null", "None", "auto") else resume)
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
    """This launch's token. The ranks of one multi-task SLURM step (``srun``) share it: ``j<job>.<step>``; any other
    launch draws a random one, also inside a SLURM job (two launches of one job then never share a directory),
    prefixed by the job (and array task) id so that a run directory names its job."""
    import os
    import uuid

    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    prefix = (f"j{job}" + (f"_{task}" if task else "") + "_") if job else ""
    if job and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_STEP_ID"):
        return f"{prefix}s{os.environ['SLURM_STEP_ID']}"
    return prefix + uuid.uuid4().hex[:6]


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


SCHEMA_FILE = CONF_DIR / "schema.yaml"
MISSING = object()  # a mandatory value (???) not given


@functools.cache
def schema() -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """``conf/schema.yaml``: the rule of every key (patterns may hold ``*`` for one part), and the top-level keys
    checked elsewhere (read once per process)."""
    table = OmegaConf.to_container(OmegaConf.load(SCHEMA_FILE))
    return table["rules"], tuple(table.get("unchecked") or ())


def rule_for(key: str, rules: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The rule of ``key``: its own, else the first pattern whose parts match (``*`` matches one part)."""
    if key in rules:
        return rules[key]
    parts = key.split(".")
    for pattern, rule in _patterns(id(rules), rules).get(len(parts), ()):
        if all(a == "*" or a == b for a, b in zip(pattern, parts, strict=True)):
            return rule
    return None


_PATTERNS: dict[int, dict[int, list]] = {}


def _patterns(key: int, rules: dict[str, dict[str, Any]]) -> dict[int, list]:
    """The ``*`` patterns of a rule table by their number of parts (computed once per table)."""
    if key not in _PATTERNS:
        found: dict[int, list] = {}
        for pattern, rule in rules.items():
            if "*" in pattern:
                found.setdefault(pattern.count(".") + 1, []).append((pattern.split("."), rule))
        _PATTERNS[key] = found
    return _PATTERNS[key]


def _range(rule: dict[str, Any]) -> str:
    low = f"> {rule['above']}" if "above" in rule else f">= {rule['min']}" if "min" in rule else ""
    high = f"< {rule['below']}" if "below" in rule else f"<= {rule['max']}" if "max" in rule else ""
    return " and ".join(b for b in (low, high) if b)


def describe(rule: dict[str, Any]) -> str:
    """What a rule accepts, in words (the end of the refusal's ``must be ...``)."""
    kind = rule["type"]
    if kind == "int":
        text = f"a whole number {_range(rule)}".rstrip()
    elif kind == "number":
        text = f"a finite number {_range(rule)}".rstrip()
    elif kind == "bool":
        text = "true or false"
    elif kind == "choice":
        text = "one of " + " | ".join(str(c) for c in rule["choices"])
    elif kind == "list":
        size = f"{rule['length']} " if "length" in rule else ""
        text = f"a list of {size}items, each " + describe(rule["item"]) if "item" in rule else "a list"
    elif kind == "mapping":
        text = "a mapping of keys to values"
    else:
        text = "text"
    return text + "".join(f" or {_show(a)}" for a in rule.get("also") or ())


def violates(value: Any, rule: dict[str, Any]) -> bool:
    """Whether ``value`` breaks ``rule`` (``conf/schema.yaml``)."""
    if any(value == a and type(value) is type(a) for a in rule.get("also") or ()):
        return False
    kind = rule["type"]
    if kind == "bool":
        return not isinstance(value, bool)
    if kind == "text":
        return not isinstance(value, str)
    if kind == "mapping":
        return not isinstance(value, DictConfig | dict)
    if kind == "choice":
        return isinstance(value, bool) or value is None or str(value) not in [str(c) for c in rule["choices"]]
    if kind == "list":
        if not isinstance(value, ListConfig | list):
            return True
        if "length" in rule and len(value) != rule["length"]:
            return True
        return "item" in rule and any(violates(v, rule["item"]) for v in value)
    whole = kind == "int"
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
        return True
    if not math.isfinite(value):
        return True
    return (("min" in rule and value < rule["min"]) or ("max" in rule and value > rule["max"])
            or ("above" in rule and value <= rule["above"]) or ("below" in rule and value >= rule["below"]))


def leaves(cfg: DictConfig, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every key of ``cfg`` (lists whole, mappings as themselves and then their keys),
    interpolations resolved and visited last (a value typed at its source is named there), a mandatory value not
    given as ``MISSING``; keys under ``skip`` (top-level names) and keys that do not resolve are left out."""
    later: list[tuple[str, Any]] = []

    def walk(node: DictConfig, prefix: str) -> Iterator[tuple[str, Any]]:
        for k in node:
            key = f"{prefix}{k}"
            if not prefix and k in skip:
                continue
            if OmegaConf.is_missing(node, k):
                yield key, MISSING
                continue
            try:
                value = node[k]
            except Exception:  # noqa: BLE001 - a key this command cannot resolve is checked where it is used
                continue
            if OmegaConf.is_interpolation(node, k):
                later.append((key, value))
                continue
            yield key, value
            if isinstance(value, DictConfig):
                yield from walk(value, key + ".")

    yield from walk(cfg, "")
    yield from later


def check_values(cfg: DictConfig) -> None:
    """One place for the values a user types: a missing mandatory value (``???``), or any key whose value breaks
    its rule in ``conf/schema.yaml``, is a ``ConfigError`` of one line naming key, value and what it must be. Every
    entry point calls it before any work (``segvoc.app``: before Hydra creates a folder, and per job in a sweep)."""
    from segvoc.errors import ConfigError

    rules, unchecked = schema()
    found = list(leaves(cfg, unchecked))
    for key in sorted(k for k, v in found if v is MISSING):
        raise ConfigError(f"{key} is required: add {key}=<value> to the command (see the comment on {key} in "
                          f"{_config_file()})")
    for key, value in found:
        rule = rule_for(key, rules)
        if rule is None:
            continue
        if violates(value, rule):
            raise ConfigError(f"{key}={_show(value)}: must be {describe(rule)} ({rule['what']})")


def _config_file() -> str:
    from hydra.core.hydra_config import HydraConfig

    return f"conf/{HydraConfig.get().job.config_name}.yaml" if HydraConfig.initialized() else "conf/"


def _show(value: object) -> str:
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value)
