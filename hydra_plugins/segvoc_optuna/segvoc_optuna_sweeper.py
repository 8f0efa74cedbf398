"""``hydra/sweeper=segvoc_optuna``: a Hydra sweeper on Optuna >= 4 (what ``hparams_search=optuna`` selects).

The search space is Hydra's sweep syntax in ``hydra.sweeper.params`` (``interval(a, b)``, ``tag(log, interval(a,
b))``, ``choice(x, y)``, ``range(a, b, step)``), as in hydra-optuna-sweeper 1.3, which this replaces. Differences:

- ``storage``: an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``) or ``journal:<file>`` (Optuna's journal
  file storage: a study on a shared file system, without a database server);
- the sampler's seed is advanced by the number of trials the study already holds, so a continued study samples new
  points instead of repeating the first launch's;
- the study records its definition (``segvoc.config.search_definition``); a launch whose definition differs is
  refused in one line;
- ``pruner``: trials report ``val/<optimized_metric>`` every epoch (``segvoc.runs.optuna_study.OptunaPruning``); a
  pruned trial is told to Optuna as PRUNED.

The study bookkeeping that is not the search itself (continuing to ``n_trials`` in total, re-queueing trials left
RUNNING, ``optuna_best.yaml``) is the Hydra callback ``segvoc.runs.optuna_study.OptunaStudy``.
"""

# no `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SegvocOptunaSweeperConf:
    """``hydra.sweeper.*`` (documented in ``conf/hparams_search/optuna.yaml``)."""

    _target_: str = "hydra_plugins.segvoc_optuna.segvoc_optuna_sweeper.SegvocOptunaSweeper"
    _recursive_: bool = False  # sampler and pruner stay configs: the sweeper seeds and builds them
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING   # from hydra/sweeper/sampler (MISSING: the group's choice is not merged over)
    pruner: Any = MISSING    # from hydra/sweeper/pruner
    direction: str = "maximize"
    storage: Any = None      # sqlite:///..., postgresql://..., journal:<file>
    study_name: Any = None
    n_trials: int = 20
    n_jobs: int = 1
    params: Any = None       # parameter -> Hydra sweep (interval, tag(log, interval), choice, range)


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="segvoc_optuna", node=SegvocOptunaSweeperConf, provider="segvoc")
_SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": 1234, "n_startup_trials": 5},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": 1234, "n_startup_trials": 5},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": 1234, "n_startup_trials": 5},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": 1234},
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": 1234},  # the grid comes from the params
}
_PRUNERS = {
    "none": {"_target_": "optuna.pruners.NopPruner"},
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 1},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1, "max_resource": "auto",
                  "reduction_factor": 3},
}
for _name, _node in _SAMPLERS.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="segvoc")
for _name, _node in _PRUNERS.items():
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="segvoc")


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (None: a fixed value, not a search parameter)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        assert isinstance(value, ChoiceSweep | RangeSweep)
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise NotImplementedError(f"{override.input_line}: not a sweep the Optuna sweeper supports")


def search_space(arguments: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(search parameters -> distribution, fixed overrides -> value) of the sweeper's params and typed overrides."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        dist = distribution(override)
        if dist is None:
            fixed[override.get_key_element()] = override.get_value_element_as_str()
        else:
            space[override.get_key_element()] = dist
    return space, fixed


def _grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    grid = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution | FloatDistribution) and dist.step is not None and not dist.log:
            n = int(round((dist.high - dist.low) / dist.step)) + 1
            grid[name] = [dist.low + i * dist.step for i in range(n)]
        else:
            raise ValueError(f"{name}: the grid sampler needs choice() or range() parameters, not {dist}")
    return grid


class SegvocOptunaSweeper(Sweeper):
    """Ask Optuna for ``n_jobs`` trials at a time, launch them as Hydra jobs, tell Optuna their results."""

    def __init__(self, sampler: Any, pruner: Any, direction: str, storage: str | None, study_name: str | None,
                 n_trials: int, n_jobs: int, params: Any = None) -> None:
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction, self.storage_url, self.study_name = str(direction), storage, study_name
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.params = params or {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def _sampler(self, space: dict[str, Any], n_done: int) -> Any:
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True) if isinstance(self.sampler_cfg, DictConfig) \
            else dict(self.sampler_cfg or {"_target_": "optuna.samplers.TPESampler"})
        if cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + n_done  # a continued study draws new points (not the first launch's)
        if cfg["_target_"].endswith("GridSampler"):
            return instantiate(cfg, search_space=_grid(space))
        return instantiate(cfg)

    def sweep(self, arguments: list[str]) -> None:
        from segvoc.config import search_definition
        from segvoc.extras import require
        from segvoc.runs.optuna_study import OWNER_ATTR, TRIAL_ENV, open_storage, owner, refusal

        optuna = require("sweep", "hydra/sweeper=segvoc_optuna")

        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space(params + list(arguments))
        for name in fixed:
            space.pop(name, None)
        storage = open_storage(self.storage_url)
        pruner = instantiate(self.pruner_cfg) if self.pruner_cfg else optuna.pruners.NopPruner()
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                    pruner=pruner, load_if_exists=True)
        definition = search_definition(self.config.hydra.overrides.task, self.params)
        stored = study.user_attrs.get("segvoc_definition")
        if stored is None:
            study.set_user_attr("segvoc_definition", definition)
        elif stored != json.loads(json.dumps(definition)):
            print(refusal(study.study_name, stored, definition), file=sys.stderr, flush=True)
            raise SystemExit(2)
        study.sampler = self._sampler(space, len(study.trials))
        log.info("study %s (%s), sampler %s, pruner %s", study.study_name, self.storage_url,
                 type(study.sampler).__name__, type(pruner).__name__)
        to_go = self.n_trials
        if study.sampler.__class__.__name__ == "GridSampler":
            to_go = min(to_go, math.prod(len(v) for v in _grid(space).values()))
        while to_go > 0:
            batch = min(to_go, self.n_jobs)
            trials = [study.ask(space) for _ in range(batch)]
            for t in trials:  # who runs it: a later launch re-queues it only if this process is gone
                t.set_user_attr(OWNER_ATTR, owner())
            # the job finds its trial (for pruning) through its environment: study, storage, trial number
            env = {"SEGVOC_OPTUNA_STUDY": study.study_name, "SEGVOC_OPTUNA_STORAGE": str(self.storage_url or "")}
            overrides = [tuple(f"{k}={v}" for k, v in {**t.params, **fixed}.items())
                         + tuple(f"++hydra.job.env_set.{k}={_quoted(v)}" for k, v in env.items())
                         + (f"++hydra.job.env_set.{TRIAL_ENV}={t.number}",) for t in trials]
            returns = []
            for start, end in _consecutive([t.number for t in trials]):
                # a job's number is its trial's number: job directories match trials, also when several
                # processes (nodes) add trials to one study at once
                returns += self.launcher.launch(overrides[start:end], initial_job_idx=trials[start].number)
            for trial, ret in zip(trials, returns, strict=True):
                _tell(study, trial, ret)
            to_go -= batch


def _quoted(value: str) -> str:
    """A Hydra override value that stays the string ``value``."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _consecutive(numbers: list[int]) -> list[tuple[int, int]]:
    """Index ranges [start, end) of ``numbers`` that count up by one."""
    ranges, start = [], 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            ranges.append((start, i))
            start = i
    return ranges


def _tell(study: Any, trial: Any, ret: Any) -> None:
    """Tell Optuna how a trial's job ended: COMPLETE with its value, PRUNED (the job wrote ``PRUNED.json``), or FAIL
    (an exception, or the NaN that ``segvoc.train`` returns for a failed job)."""
    import optuna

    from segvoc.runs.sweep import PRUNED_MARKER

    state = optuna.trial.TrialState
    out = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg is not None else None
    if out is not None and (out / PRUNED_MARKER).is_file():
        study.tell(trial, state=state.PRUNED)
        return
    try:
        value = float(ret.return_value)
    except Exception as exc:  # the job raised; JobReturn re-raises it here
        log.warning("trial %d failed: %s", trial.number, exc)
        study.tell(trial, state=state.FAIL)
        return
    if math.isnan(value) or math.isinf(value):
        study.tell(trial, state=state.FAIL)
    else:
        study.tell(trial, value)

